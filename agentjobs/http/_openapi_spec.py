"""Generated from docs/openapi.yaml by `python -m agentjobs.http.openapi_gen`. Do not edit."""

# ruff: noqa: E501

SPEC_JSON = r"""
{
  "openapi": "3.1.0",
  "info": {
    "title": "agentjobs",
    "version": "0.1.0",
    "summary": "A durable job server for long-running AI-agent tasks (REST + SSE).",
    "description": "Compatible with PraisonAI's async jobs API (same paths, field names, status codes\nand SSE event names), plus resumable streams, idempotency checked against the body,\ncursor pagination and problem+json errors. See docs/api.md for examples and the\nmeaning of every problem type.\n\nAuthentication: when the server has API keys (docs/security.md), every endpoint but\n`/health` and `/openapi.json` needs one, as `Authorization: Bearer <key>` or\n`X-API-Key: <key>` (401 otherwise); each key belongs to a tenant, which sees only its\nown runs (another tenant's run is 404). Without keys the server is open (loopback).\n",
    "license": {
      "name": "MIT"
    }
  },
  "servers": [
    {
      "url": "http://127.0.0.1:8005",
      "description": "the default `agentjobs serve` address"
    }
  ],
  "tags": [
    {
      "name": "runs"
    },
    {
      "name": "service"
    }
  ],
  "security": [
    {
      "bearer": []
    },
    {
      "apiKeyHeader": []
    },
    {}
  ],
  "paths": {
    "/api/v1/runs": {
      "post": {
        "tags": [
          "runs"
        ],
        "operationId": "submitRun",
        "summary": "Submit a run",
        "description": "Answers 202 once the run is durable (per the server's durability setting).\nWith an idempotency key (header, else body field), the same key with the same\nbody returns the original run (header `Idempotent-Replayed: true`); the same key\nwith a different body is 422.\n",
        "parameters": [
          {
            "$ref": "#/components/parameters/IdempotencyKey"
          }
        ],
        "requestBody": {
          "required": true,
          "content": {
            "application/json": {
              "schema": {
                "$ref": "#/components/schemas/SubmitRequest"
              }
            }
          }
        },
        "responses": {
          "202": {
            "description": "Accepted (or an idempotent replay of an earlier submit).",
            "headers": {
              "Location": {
                "description": "The run's status URL (relative unless a public URL is configured).",
                "schema": {
                  "type": "string"
                }
              },
              "Retry-After": {
                "description": "Seconds before the first poll is worthwhile.",
                "schema": {
                  "type": "string"
                }
              },
              "Idempotent-Replayed": {
                "description": "`true` when the answer is the run of an earlier submit with the same key.",
                "schema": {
                  "type": "string",
                  "enum": [
                    "true"
                  ]
                }
              }
            },
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/SubmitResponse"
                }
              }
            }
          },
          "400": {
            "$ref": "#/components/responses/Problem"
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "413": {
            "$ref": "#/components/responses/Problem"
          },
          "415": {
            "$ref": "#/components/responses/Problem"
          },
          "422": {
            "$ref": "#/components/responses/Problem"
          },
          "429": {
            "$ref": "#/components/responses/RateLimited"
          },
          "503": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      },
      "get": {
        "tags": [
          "runs"
        ],
        "operationId": "listRuns",
        "summary": "List runs, newest first",
        "description": "Two ways to page: PraisonAI's `page`/`page_size` (offset pages), or `limit` and\n`cursor` (pass back `next_cursor`; stable while runs are added). `limit` and\n`page_size` are the same setting.\n",
        "parameters": [
          {
            "name": "status",
            "in": "query",
            "schema": {
              "$ref": "#/components/schemas/Status"
            }
          },
          {
            "name": "session_id",
            "in": "query",
            "schema": {
              "type": "string"
            }
          },
          {
            "name": "limit",
            "in": "query",
            "schema": {
              "type": "integer",
              "minimum": 1,
              "maximum": 1000,
              "default": 20
            }
          },
          {
            "name": "page_size",
            "in": "query",
            "schema": {
              "type": "integer",
              "minimum": 1,
              "maximum": 1000,
              "default": 20
            }
          },
          {
            "name": "page",
            "in": "query",
            "schema": {
              "type": "integer",
              "minimum": 1,
              "maximum": 9007199254740991,
              "default": 1
            }
          },
          {
            "name": "cursor",
            "in": "query",
            "schema": {
              "type": "string"
            }
          }
        ],
        "responses": {
          "200": {
            "description": "A page of runs.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/JobList"
                }
              }
            }
          },
          "400": {
            "$ref": "#/components/responses/Problem"
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "422": {
            "$ref": "#/components/responses/Problem"
          }
        }
      }
    },
    "/api/v1/runs/batch": {
      "post": {
        "tags": [
          "runs"
        ],
        "operationId": "submitRunBatch",
        "summary": "Submit many runs in one request",
        "description": "Each item of `runs` is exactly a `POST /api/v1/runs` body, validated the same way;\nitems are independent (a refused item has its problem in `results` and does not\nstop the others). Every new run of the batch is recorded in one group commit (one\nwrite, one fsync) before the answer. Idempotency is per item (its own\n`idempotency_key`; the same key twice in one batch makes the second a replay of\nthe first, or a conflict); the `Idempotency-Key` header is refused (422). The\nbatch as a whole is refused, with nothing written, when its shape is wrong (422),\nit is too large (413, `--max-batch-bytes`), the queue cannot take all its new runs\n(503), the tenant's rate or quota cannot take them yet (429, a batch of N counting\nas N submits; `Retry-After` is the wait until the whole batch fits: exact for the\nrate, an estimate from recent finishes for the quota), or storage\nfails (503). A batch that could never pass the tenant's limits (more items than\n`--tenant-burst`, more new runs than `--tenant-max-queued` or `--max-queue`) is 422\nnaming `runs`.\n",
        "requestBody": {
          "required": true,
          "content": {
            "application/json": {
              "schema": {
                "$ref": "#/components/schemas/BatchRequest"
              }
            }
          }
        },
        "responses": {
          "200": {
            "description": "One result per item, in order.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/BatchResponse"
                }
              }
            }
          },
          "400": {
            "$ref": "#/components/responses/Problem"
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "413": {
            "$ref": "#/components/responses/Problem"
          },
          "415": {
            "$ref": "#/components/responses/Problem"
          },
          "422": {
            "$ref": "#/components/responses/Problem"
          },
          "429": {
            "$ref": "#/components/responses/RateLimited"
          },
          "503": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "get": {
        "tags": [
          "runs"
        ],
        "operationId": "getRun",
        "summary": "A run's status",
        "responses": {
          "200": {
            "description": "The run.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/JobStatus"
                }
              }
            }
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          }
        }
      },
      "delete": {
        "tags": [
          "runs"
        ],
        "operationId": "deleteRun",
        "summary": "Forget a finished run",
        "description": "Finished runs only; frees its idempotency key.",
        "responses": {
          "204": {
            "description": "Deleted."
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          },
          "409": {
            "$ref": "#/components/responses/Problem"
          },
          "503": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}/result": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "get": {
        "tags": [
          "runs"
        ],
        "operationId": "getResult",
        "summary": "A finished run's result",
        "description": "200 for every finished run (succeeded, failed, cancelled); 409 while it is not\nfinished. `wait` long-polls up to that many seconds (capped by the server's\n`--max-wait`, default 60) for the run to finish.\n",
        "parameters": [
          {
            "name": "wait",
            "in": "query",
            "schema": {
              "type": "number",
              "minimum": 0
            }
          }
        ],
        "responses": {
          "200": {
            "description": "The result.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/JobResult"
                }
              }
            }
          },
          "400": {
            "$ref": "#/components/responses/Problem"
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          },
          "409": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}/stream": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "get": {
        "tags": [
          "runs"
        ],
        "operationId": "streamRun",
        "summary": "The run's events as server-sent events",
        "security": [
          {
            "bearer": []
          },
          {
            "apiKeyHeader": []
          },
          {
            "apiKeyQuery": []
          },
          {}
        ],
        "description": "Replays what already happened, follows live, ends after the terminal event.\nEvent names: `status`, `progress`, `output`, `result`, `error`, `cancelled`,\n`heartbeat`, `shutdown`. Every event has an `id:`; `Last-Event-ID` (or `after`)\nresumes after that id with nothing lost or repeated. Each `data:` is one line of\nJSON (see the `StreamEvent` schema for the payloads).\n",
        "parameters": [
          {
            "name": "Last-Event-ID",
            "in": "header",
            "schema": {
              "$ref": "#/components/schemas/EventId"
            }
          },
          {
            "name": "after",
            "in": "query",
            "schema": {
              "$ref": "#/components/schemas/EventId"
            }
          }
        ],
        "responses": {
          "200": {
            "description": "The event stream.",
            "content": {
              "text/event-stream": {
                "schema": {
                  "type": "string",
                  "description": "SSE frames; each `data:` is a `StreamEvent` payload."
                }
              }
            }
          },
          "204": {
            "description": "The run is finished and the given id was its last event; nothing to stream."
          },
          "400": {
            "$ref": "#/components/responses/Problem"
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          },
          "429": {
            "$ref": "#/components/responses/RateLimited"
          },
          "503": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}/events": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "get": {
        "tags": [
          "runs"
        ],
        "operationId": "listRunEvents",
        "summary": "The stream's events as JSON pages",
        "description": "The same events and ids as the stream, for clients that poll.",
        "parameters": [
          {
            "name": "after",
            "in": "query",
            "schema": {
              "$ref": "#/components/schemas/EventId"
            }
          },
          {
            "name": "limit",
            "in": "query",
            "schema": {
              "type": "integer",
              "minimum": 1,
              "maximum": 1000,
              "default": 100
            }
          }
        ],
        "responses": {
          "200": {
            "description": "A page of events.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/EventsPage"
                }
              }
            }
          },
          "400": {
            "$ref": "#/components/responses/Problem"
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          },
          "422": {
            "$ref": "#/components/responses/Problem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}/cancel": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "post": {
        "tags": [
          "runs"
        ],
        "operationId": "cancelRun",
        "summary": "Cancel a run",
        "description": "A queued run is cancelled at once. A running run is stopped for real (its runner\ncancelled, its processes gone) before the answer, which is then 200 with status\n`cancelled`; if it does not stop within the server's `--cancel-wait`, the answer\nis 202 with the run still running and `cancel_requested: true`.\n",
        "responses": {
          "200": {
            "description": "Cancelled.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/JobStatus"
                }
              }
            }
          },
          "202": {
            "description": "Cancel recorded; the run has not stopped yet.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/JobStatus"
                }
              }
            }
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          },
          "409": {
            "$ref": "#/components/responses/Problem"
          },
          "503": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}/webhooks": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "get": {
        "tags": [
          "runs"
        ],
        "operationId": "getWebhookDeliveries",
        "summary": "The run's webhook delivery history",
        "description": "See docs/webhooks.md.",
        "responses": {
          "200": {
            "description": "The delivery history.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/WebhookHistory"
                }
              }
            }
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          }
        }
      }
    },
    "/api/v1/runs/{job_id}/webhooks/redeliver": {
      "parameters": [
        {
          "$ref": "#/components/parameters/JobId"
        }
      ],
      "post": {
        "tags": [
          "runs"
        ],
        "operationId": "redeliverWebhook",
        "summary": "Deliver the run's webhook again",
        "description": "Starts a new delivery round now, whatever the current status (a fresh schedule\nand 24 h window, the same `webhook-id` and body).\n",
        "responses": {
          "200": {
            "description": "The delivery history, with the new round pending.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/WebhookHistory"
                }
              }
            }
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          },
          "404": {
            "$ref": "#/components/responses/Problem"
          },
          "409": {
            "$ref": "#/components/responses/Problem"
          },
          "422": {
            "$ref": "#/components/responses/Problem"
          },
          "503": {
            "$ref": "#/components/responses/RetryableProblem"
          }
        }
      }
    },
    "/health": {
      "get": {
        "tags": [
          "service"
        ],
        "operationId": "health",
        "summary": "Liveness and basic figures",
        "description": "Always open. With API keys or a metrics key configured, the server-wide figures\n(`queued`, `runs`, `by_status`, ...) are only included for a caller presenting a key\nthat may read `/metrics`; others get the liveness fields.\n",
        "security": [
          {},
          {
            "bearer": []
          },
          {
            "apiKeyHeader": []
          }
        ],
        "responses": {
          "200": {
            "description": "Serving.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/Health"
                }
              }
            }
          },
          "503": {
            "description": "Shutting down (load balancers should stop sending traffic).",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/Health"
                }
              }
            }
          }
        }
      }
    },
    "/stats": {
      "get": {
        "tags": [
          "service"
        ],
        "operationId": "stats",
        "summary": "Engine figures as JSON",
        "description": "Protected like `/metrics`.",
        "responses": {
          "200": {
            "description": "Figures.",
            "content": {
              "application/json": {
                "schema": {
                  "$ref": "#/components/schemas/Stats"
                }
              }
            }
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          }
        }
      }
    },
    "/metrics": {
      "get": {
        "tags": [
          "service"
        ],
        "operationId": "metrics",
        "summary": "Prometheus metrics (text format 0.0.4)",
        "description": "With a metrics key configured (`--metrics-key`), only that key opens it; else, with\nAPI keys configured, any API key does; else it is open. No tenant labels.\n",
        "security": [
          {
            "metricsKey": []
          },
          {
            "bearer": []
          },
          {
            "apiKeyHeader": []
          },
          {}
        ],
        "responses": {
          "200": {
            "description": "Metrics.",
            "content": {
              "text/plain": {
                "schema": {
                  "type": "string"
                }
              }
            }
          },
          "401": {
            "$ref": "#/components/responses/Unauthorized"
          }
        }
      }
    },
    "/openapi.json": {
      "get": {
        "tags": [
          "service"
        ],
        "operationId": "openapi",
        "summary": "This document, as JSON",
        "security": [
          {}
        ],
        "responses": {
          "200": {
            "description": "The OpenAPI document.",
            "content": {
              "application/json": {
                "schema": {
                  "type": "object"
                }
              }
            }
          }
        }
      }
    }
  },
  "components": {
    "parameters": {
      "JobId": {
        "name": "job_id",
        "in": "path",
        "required": true,
        "schema": {
          "type": "string",
          "pattern": "^run_"
        }
      },
      "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "description": "1-255 printable ASCII characters; wins over the body's `idempotency_key`.",
        "schema": {
          "type": "string",
          "minLength": 1,
          "maxLength": 255
        }
      }
    },
    "securitySchemes": {
      "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`; when present it alone decides."
      },
      "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key"
      },
      "apiKeyQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "api_key",
        "description": "Only on the stream endpoint and only when the server runs with `--sse-query-key`,\nfor browser `EventSource`, which cannot send headers (URLs are logged by proxies).\n"
      },
      "metricsKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The `--metrics-key`, as `Authorization: Bearer` or `X-API-Key`."
      }
    },
    "responses": {
      "Unauthorized": {
        "description": "No API key, or not a valid one (problem type `unauthorized`).",
        "headers": {
          "WWW-Authenticate": {
            "schema": {
              "type": "string"
            }
          }
        },
        "content": {
          "application/problem+json": {
            "schema": {
              "$ref": "#/components/schemas/Problem"
            }
          }
        }
      },
      "RateLimited": {
        "description": "A per-tenant limit (problem type `rate-limited`; its `limit` says which);\n`Retry-After` says when to try again. Nothing was recorded.\n",
        "headers": {
          "Retry-After": {
            "schema": {
              "type": "string"
            }
          }
        },
        "content": {
          "application/problem+json": {
            "schema": {
              "$ref": "#/components/schemas/Problem"
            }
          }
        }
      },
      "Problem": {
        "description": "An RFC 9457 problem (see docs/api.md for every type).",
        "content": {
          "application/problem+json": {
            "schema": {
              "$ref": "#/components/schemas/Problem"
            }
          }
        }
      },
      "RetryableProblem": {
        "description": "An RFC 9457 problem; `Retry-After` says when to try again.",
        "headers": {
          "Retry-After": {
            "schema": {
              "type": "string"
            }
          }
        },
        "content": {
          "application/problem+json": {
            "schema": {
              "$ref": "#/components/schemas/Problem"
            }
          }
        }
      }
    },
    "schemas": {
      "Status": {
        "type": "string",
        "enum": [
          "queued",
          "running",
          "succeeded",
          "failed",
          "cancelled"
        ]
      },
      "Timestamp": {
        "type": "string",
        "description": "ISO-8601 UTC with microseconds and `Z`.",
        "pattern": "^\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}\\.\\d{6}Z$"
      },
      "NullableTimestamp": {
        "oneOf": [
          {
            "$ref": "#/components/schemas/Timestamp"
          },
          {
            "type": "null"
          }
        ]
      },
      "EventId": {
        "type": "string",
        "description": "A stream event id, `<seq>` or `<seq>.<part>`; `0` is the start.",
        "pattern": "^(0|[1-9][0-9]{0,18})(\\.[1-9][0-9]{0,2})?$"
      },
      "JobId": {
        "type": "string",
        "pattern": "^run_[0-9a-f]{32}$"
      },
      "SubmitRequest": {
        "type": "object",
        "required": [
          "prompt"
        ],
        "additionalProperties": false,
        "description": "Unknown fields are refused (422 naming them). PraisonAI's `agent_file`,\n`agent_yaml`, `framework`, `recipe_name`, `recipe_config` are accepted when null\n(or `{}` for `recipe_config`) and refused with `unsupported-field` otherwise;\n`idempotency_scope` accepts only `\"none\"` or null.\n",
        "properties": {
          "prompt": {
            "type": "string",
            "minLength": 1,
            "description": "Must contain a non-space character."
          },
          "config": {
            "type": [
              "object",
              "null"
            ],
            "description": "Passed to the runner (e.g. the echo runner's `delay_s`, `steps`, `output`, `fail`)."
          },
          "session_id": {
            "type": [
              "string",
              "null"
            ],
            "minLength": 1
          },
          "webhook_url": {
            "type": [
              "string",
              "null"
            ],
            "format": "uri"
          },
          "timeout": {
            "type": [
              "number",
              "null"
            ],
            "exclusiveMinimum": 0,
            "description": "Seconds of running before the run fails."
          },
          "idempotency_key": {
            "type": [
              "string",
              "null"
            ],
            "minLength": 1,
            "maxLength": 255
          },
          "priority": {
            "type": [
              "integer",
              "null"
            ],
            "minimum": -9007199254740992,
            "maximum": 9007199254740992,
            "description": "Higher starts first; default 0."
          },
          "max_attempts": {
            "type": [
              "integer",
              "null"
            ],
            "minimum": 1,
            "maximum": 100
          },
          "runner": {
            "type": [
              "string",
              "null"
            ],
            "description": "A configured runner name; default the server's."
          },
          "ttl": {
            "type": [
              "number",
              "null"
            ],
            "exclusiveMinimum": 0,
            "description": "Seconds the run may wait in the queue before it expires."
          },
          "idempotency_scope": {
            "type": [
              "string",
              "null"
            ],
            "enum": [
              "none",
              null
            ]
          },
          "agent_file": {
            "type": "null"
          },
          "agent_yaml": {
            "type": "null"
          },
          "framework": {
            "type": "null"
          },
          "recipe_name": {
            "type": "null"
          },
          "recipe_config": {
            "type": [
              "object",
              "null"
            ],
            "maxProperties": 0
          }
        }
      },
      "SubmitResponse": {
        "type": "object",
        "required": [
          "job_id",
          "status",
          "created_at",
          "poll_url",
          "stream_url"
        ],
        "properties": {
          "job_id": {
            "$ref": "#/components/schemas/JobId"
          },
          "status": {
            "$ref": "#/components/schemas/Status"
          },
          "created_at": {
            "$ref": "#/components/schemas/Timestamp"
          },
          "poll_url": {
            "type": "string"
          },
          "stream_url": {
            "type": "string"
          }
        }
      },
      "BatchRequest": {
        "type": "object",
        "required": [
          "runs"
        ],
        "additionalProperties": false,
        "properties": {
          "runs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1000,
            "description": "Submit bodies, at most `--max-batch` (default 1000). Each is validated on its\nown: an invalid item is answered in its result (422 there), not by refusing\nthe batch.\n",
            "items": {
              "$ref": "#/components/schemas/SubmitRequest"
            }
          }
        }
      },
      "BatchResponse": {
        "type": "object",
        "required": [
          "accepted",
          "rejected",
          "results"
        ],
        "properties": {
          "accepted": {
            "type": "integer",
            "minimum": 0,
            "description": "Items answered 202 (new runs and replays)."
          },
          "rejected": {
            "type": "integer",
            "minimum": 0
          },
          "results": {
            "type": "array",
            "items": {
              "oneOf": [
                {
                  "$ref": "#/components/schemas/BatchAccepted"
                },
                {
                  "$ref": "#/components/schemas/BatchRejected"
                }
              ]
            }
          }
        }
      },
      "BatchAccepted": {
        "type": "object",
        "required": [
          "index",
          "status",
          "job_id",
          "job_status",
          "created_at",
          "poll_url",
          "stream_url",
          "replayed"
        ],
        "properties": {
          "index": {
            "type": "integer",
            "minimum": 0
          },
          "status": {
            "type": "integer",
            "enum": [
              202
            ]
          },
          "job_id": {
            "$ref": "#/components/schemas/JobId"
          },
          "job_status": {
            "$ref": "#/components/schemas/Status"
          },
          "created_at": {
            "$ref": "#/components/schemas/Timestamp"
          },
          "poll_url": {
            "type": "string"
          },
          "stream_url": {
            "type": "string"
          },
          "replayed": {
            "type": "boolean",
            "description": "`true` when the item's key returned an earlier run."
          }
        }
      },
      "BatchRejected": {
        "type": "object",
        "required": [
          "index",
          "status",
          "problem"
        ],
        "properties": {
          "index": {
            "type": "integer",
            "minimum": 0
          },
          "status": {
            "type": "integer",
            "minimum": 400,
            "maximum": 499
          },
          "problem": {
            "$ref": "#/components/schemas/Problem"
          }
        }
      },
      "Progress": {
        "type": "object",
        "required": [
          "percentage",
          "current_step",
          "steps_completed",
          "steps_total"
        ],
        "properties": {
          "percentage": {
            "type": "number",
            "minimum": 0,
            "maximum": 100
          },
          "current_step": {
            "type": [
              "string",
              "null"
            ]
          },
          "steps_completed": {
            "type": "integer"
          },
          "steps_total": {
            "type": [
              "integer",
              "null"
            ]
          }
        }
      },
      "JobStatus": {
        "type": "object",
        "required": [
          "job_id",
          "status",
          "progress",
          "created_at",
          "started_at",
          "completed_at",
          "agent_id",
          "run_id",
          "session_id",
          "error",
          "retry_after"
        ],
        "properties": {
          "job_id": {
            "$ref": "#/components/schemas/JobId"
          },
          "status": {
            "$ref": "#/components/schemas/Status"
          },
          "progress": {
            "$ref": "#/components/schemas/Progress"
          },
          "created_at": {
            "$ref": "#/components/schemas/Timestamp"
          },
          "started_at": {
            "$ref": "#/components/schemas/NullableTimestamp"
          },
          "completed_at": {
            "$ref": "#/components/schemas/NullableTimestamp"
          },
          "agent_id": {
            "type": [
              "string",
              "null"
            ],
            "description": "The runner's name."
          },
          "run_id": {
            "type": "null",
            "description": "Always null (PraisonAI recipes only)."
          },
          "session_id": {
            "type": [
              "string",
              "null"
            ]
          },
          "error": {
            "type": [
              "string",
              "null"
            ]
          },
          "retry_after": {
            "type": [
              "integer",
              "null"
            ],
            "description": "Seconds to wait before polling again; 2 queued, 1-5 running, null finished."
          },
          "runner": {
            "type": "string"
          },
          "attempt": {
            "type": "integer",
            "minimum": 0
          },
          "max_attempts": {
            "type": "integer",
            "minimum": 1
          },
          "priority": {
            "type": "integer"
          },
          "error_kind": {
            "type": [
              "string",
              "null"
            ],
            "description": "`error`, `timeout`, `expired`, `interrupted` or `cancelled`."
          },
          "cancel_requested": {
            "type": "boolean"
          }
        }
      },
      "JobResult": {
        "type": "object",
        "required": [
          "job_id",
          "status",
          "result",
          "result_url",
          "metrics",
          "created_at",
          "started_at",
          "completed_at",
          "duration_seconds",
          "error"
        ],
        "properties": {
          "job_id": {
            "$ref": "#/components/schemas/JobId"
          },
          "status": {
            "$ref": "#/components/schemas/Status"
          },
          "result": {
            "description": "Any JSON value the runner returned (null unless succeeded)."
          },
          "result_url": {
            "type": "null"
          },
          "metrics": {
            "type": [
              "object",
              "null"
            ]
          },
          "created_at": {
            "$ref": "#/components/schemas/Timestamp"
          },
          "started_at": {
            "$ref": "#/components/schemas/NullableTimestamp"
          },
          "completed_at": {
            "$ref": "#/components/schemas/NullableTimestamp"
          },
          "duration_seconds": {
            "type": [
              "number",
              "null"
            ],
            "minimum": 0
          },
          "error": {
            "type": [
              "string",
              "null"
            ]
          },
          "error_kind": {
            "type": [
              "string",
              "null"
            ]
          },
          "session_id": {
            "type": [
              "string",
              "null"
            ]
          },
          "attempt": {
            "type": "integer",
            "minimum": 0
          }
        }
      },
      "JobList": {
        "type": "object",
        "required": [
          "jobs",
          "total",
          "page",
          "page_size",
          "next_cursor"
        ],
        "properties": {
          "jobs": {
            "type": "array",
            "items": {
              "$ref": "#/components/schemas/JobStatus"
            }
          },
          "total": {
            "type": "integer",
            "minimum": 0,
            "description": "Runs matching the filters."
          },
          "page": {
            "type": [
              "integer",
              "null"
            ],
            "minimum": 1,
            "description": "Null when paging by cursor."
          },
          "page_size": {
            "type": "integer",
            "minimum": 1
          },
          "next_cursor": {
            "type": [
              "string",
              "null"
            ]
          }
        }
      },
      "StreamEvent": {
        "type": "object",
        "required": [
          "id",
          "event",
          "data"
        ],
        "properties": {
          "id": {
            "$ref": "#/components/schemas/EventId"
          },
          "event": {
            "type": "string",
            "enum": [
              "status",
              "progress",
              "output",
              "result",
              "error",
              "cancelled"
            ]
          },
          "data": {
            "type": "object",
            "required": [
              "job_id"
            ],
            "properties": {
              "job_id": {
                "$ref": "#/components/schemas/JobId"
              },
              "status": {
                "$ref": "#/components/schemas/Status"
              },
              "timestamp": {
                "$ref": "#/components/schemas/Timestamp"
              },
              "percentage": {
                "type": "number"
              },
              "step": {
                "type": "string"
              },
              "steps_completed": {
                "type": "integer"
              },
              "steps_total": {
                "type": [
                  "integer",
                  "null"
                ]
              },
              "text": {
                "type": "string"
              },
              "result": {},
              "error": {
                "type": [
                  "string",
                  "null"
                ]
              },
              "message": {
                "type": "string"
              }
            }
          }
        }
      },
      "EventsPage": {
        "type": "object",
        "required": [
          "job_id",
          "status",
          "events",
          "next_after",
          "more",
          "finished"
        ],
        "properties": {
          "job_id": {
            "$ref": "#/components/schemas/JobId"
          },
          "status": {
            "$ref": "#/components/schemas/Status"
          },
          "events": {
            "type": "array",
            "items": {
              "$ref": "#/components/schemas/StreamEvent"
            }
          },
          "next_after": {
            "$ref": "#/components/schemas/EventId"
          },
          "more": {
            "type": "boolean",
            "description": "More events are available right now."
          },
          "finished": {
            "type": "boolean",
            "description": "The run is finished and this page holds its last event."
          }
        }
      },
      "WebhookHistory": {
        "type": "object",
        "required": [
          "job_id",
          "webhook_id",
          "status",
          "attempts",
          "next_attempt_at",
          "deliveries",
          "redeliveries"
        ],
        "properties": {
          "job_id": {
            "$ref": "#/components/schemas/JobId"
          },
          "webhook_id": {
            "type": [
              "string",
              "null"
            ],
            "description": "The `webhook-id` header of every attempt."
          },
          "status": {
            "type": "string",
            "enum": [
              "none",
              "waiting",
              "pending",
              "delivered",
              "failed"
            ]
          },
          "attempts": {
            "type": "integer",
            "minimum": 0
          },
          "next_attempt_at": {
            "$ref": "#/components/schemas/NullableTimestamp"
          },
          "deliveries": {
            "type": "array",
            "items": {
              "type": "object",
              "required": [
                "attempt",
                "at",
                "ok",
                "status_code",
                "error",
                "duration_ms",
                "next_attempt_at"
              ],
              "properties": {
                "attempt": {
                  "type": "integer",
                  "minimum": 1
                },
                "at": {
                  "$ref": "#/components/schemas/Timestamp"
                },
                "ok": {
                  "type": "boolean"
                },
                "status_code": {
                  "type": [
                    "integer",
                    "null"
                  ]
                },
                "error": {
                  "type": [
                    "string",
                    "null"
                  ]
                },
                "duration_ms": {
                  "type": [
                    "number",
                    "null"
                  ]
                },
                "next_attempt_at": {
                  "$ref": "#/components/schemas/NullableTimestamp"
                }
              }
            }
          },
          "redeliveries": {
            "type": "array",
            "items": {
              "$ref": "#/components/schemas/Timestamp"
            }
          }
        }
      },
      "Health": {
        "type": "object",
        "required": [
          "status",
          "store",
          "executor_stats"
        ],
        "properties": {
          "status": {
            "type": "string",
            "enum": [
              "healthy",
              "shutting_down"
            ]
          },
          "store": {
            "type": "string",
            "enum": [
              "journal",
              "memory"
            ]
          },
          "executor_stats": {
            "type": "object",
            "required": [
              "running_jobs",
              "max_concurrent",
              "default_timeout",
              "shutdown"
            ],
            "properties": {
              "running_jobs": {
                "type": "integer"
              },
              "max_concurrent": {
                "type": "integer"
              },
              "default_timeout": {
                "type": [
                  "number",
                  "null"
                ]
              },
              "shutdown": {
                "type": "boolean"
              }
            }
          },
          "version": {
            "type": "string"
          },
          "uptime_seconds": {
            "type": "number"
          },
          "durability": {
            "type": "string",
            "enum": [
              "fsync",
              "os",
              "memory"
            ]
          },
          "queued": {
            "type": "integer"
          },
          "running": {
            "type": "integer"
          },
          "runs": {
            "type": "integer"
          },
          "by_status": {
            "type": "object",
            "additionalProperties": {
              "type": "integer"
            }
          },
          "default_runner": {
            "type": "string"
          },
          "runners": {
            "type": "array",
            "items": {
              "type": "string"
            }
          },
          "open_streams": {
            "type": "integer"
          },
          "webhooks_pending": {
            "type": [
              "integer",
              "null"
            ]
          }
        }
      },
      "Stats": {
        "type": "object",
        "required": [
          "queued",
          "running",
          "runs",
          "by_status",
          "submitted_total",
          "finished_total"
        ],
        "properties": {
          "queued": {
            "type": "integer"
          },
          "running": {
            "type": "integer"
          },
          "runs": {
            "type": "integer"
          },
          "by_status": {
            "type": "object",
            "additionalProperties": {
              "type": "integer"
            }
          },
          "submitted_total": {
            "type": "integer"
          },
          "finished_total": {
            "type": "object",
            "additionalProperties": {
              "type": "integer"
            }
          }
        }
      },
      "Problem": {
        "type": "object",
        "required": [
          "type",
          "title",
          "status",
          "detail"
        ],
        "description": "RFC 9457 problem details; `detail` is always a readable string.",
        "properties": {
          "type": {
            "type": "string",
            "format": "uri",
            "pattern": "^https://agentjobs\\.dev/problems/[a-z-]+$"
          },
          "title": {
            "type": "string"
          },
          "status": {
            "type": "integer"
          },
          "detail": {
            "type": "string"
          },
          "instance": {
            "type": "string"
          },
          "errors": {
            "type": "array",
            "description": "The invalid fields, for validation problems.",
            "items": {
              "type": "object",
              "required": [
                "field",
                "message"
              ],
              "properties": {
                "field": {
                  "type": "string"
                },
                "message": {
                  "type": "string"
                }
              }
            }
          },
          "job_id": {
            "type": "string"
          },
          "job_status": {
            "$ref": "#/components/schemas/Status"
          },
          "limit": {
            "type": "string",
            "description": "For `rate-limited`, the limit that refused the request.",
            "enum": [
              "submit-rate",
              "tenant-queue",
              "tenant-streams"
            ]
          }
        }
      }
    }
  }
}
"""
