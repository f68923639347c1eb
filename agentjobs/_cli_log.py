"""`agentjobs log ...`: verify, inspect, compact and repair a journal. (Being built.)"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("log", help="inspect and maintain a journal")
    p.set_defaults(func=lambda args: 2)
