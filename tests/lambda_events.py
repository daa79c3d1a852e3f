"""API Gateway proxy events: REST API (payload format 1.0) and HTTP API (payload format 2.0)."""

from __future__ import annotations

import json

HOST = "abc123.execute-api.us-east-1.amazonaws.com"


def rest_v1(method: str, path: str, stage: str, body: dict | str | None = None, headers: dict | None = None) -> dict:
    """A REST API {proxy+} event: the path excludes the stage, which Zappa puts back as SCRIPT_NAME."""
    headers = {"Host": HOST, "Accept": "application/json", "X-Forwarded-Proto": "https", **(headers or {})}
    if body is not None:
        headers["Content-Type"] = "application/json"
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": f"/{stage}{path}",
            "stage": stage,
            "requestId": "req-v1",
            "identity": {"sourceIp": "203.0.113.7", "userArn": None},
        },
        "body": body if body is None or isinstance(body, str) else json.dumps(body),
        "isBase64Encoded": False,
    }


def http_v2(
    method: str, path: str, stage: str = "$default", body: dict | str | None = None, headers: dict | None = None
) -> dict:
    """An HTTP API event (payload format 2.0); the $default stage puts no stage in rawPath."""
    headers = {"host": HOST, "accept": "application/json", "x-forwarded-proto": "https", **(headers or {})}
    if body is not None:
        headers["content-type"] = "application/json"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path if stage == "$default" else f"/{stage}{path}",
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": "pytest",
            },
            "stage": stage,
            "requestId": "req-v2",
            "routeKey": "$default",
        },
        "body": body if body is None or isinstance(body, str) else json.dumps(body),
        "isBase64Encoded": False,
    }
