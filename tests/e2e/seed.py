"""The seed project's README walkthrough, as written, for tests to run against a stack.

Only the placeholders the seed asks the reader to replace are replaced (the payment's
id and reference), and localhost:3000 is pointed at the test's gateway port.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

PAY = """curl -X POST http://localhost:3000/api/payments/pay \\
  -H "Content-Type: application/json" \\
  -d '{
    "amount": 100.00,
    "customer_id": "test_customer",
    "description": "Test payment from DevOps"
  }'"""

STATS = "curl http://localhost:3000/api/payments/stats"

PAYLOAD = """cat > payload.json <<EOF
{"event_type":"payment.completed","payment_id":"<replace-with-id-from-Simulating-"Process-a-Payment">","provider":"test_provider","data":{"reference":"<reference-from-from-Simulating-"Process-a-Payment">"}}1
EOF"""

SIGN_AND_SEND = """signature=$(openssl dgst -sha256 -hmac "webhook-secret-key" payload.json | awk '{print $2}')
echo "Signature: $signature"

curl -X POST http://localhost:3000/api/webhooks \\
  -H "Content-Type: application/json" \\
  -H "X-Webhook-Signature: $signature" \\
  --data-binary "@payload.json\""""  # noqa: E501 - the seed's signing line, as written

# The seed's "challenge" #1: curl -d re-formats the file, so the signature no longer matches.
SEND_WITH_D = """signature=$(openssl dgst -sha256 -hmac "webhook-secret-key" payload.json | awk '{print $2}')
curl -s -X POST http://localhost:3000/api/webhooks \\
  -H "Content-Type: application/json" \\
  -H "X-Webhook-Signature: $signature" \\
  -d @payload.json"""  # noqa: E501 - the seed's signing line, as written


def shell(
    script: str, gateway_port: int, workdir: Path, *, write_out: bool = True
) -> tuple[int, str]:
    """Run `script` in bash; return the HTTP status of its first curl and what it printed."""
    script = script.replace("http://localhost:3000", f"http://127.0.0.1:{gateway_port}")
    if write_out:
        # Only to read the status code; the seed's commands print just the body.
        script = script.replace("curl ", "curl -s -w '\\n%{http_code}' ", 1)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if not write_out:
        return 0, result.stdout
    body, _, status = result.stdout.rstrip("\n").rpartition("\n")
    return int(status), body


def json_body(printed: str) -> Any:
    # The signing step echoes "Signature: …" before curl's answer.
    return json.loads(printed.splitlines()[-1])


def write_payload(payment: dict[str, Any], gateway_port: int, workdir: Path) -> None:
    heredoc = PAYLOAD.replace(
        '<replace-with-id-from-Simulating-"Process-a-Payment">', payment["id"]
    ).replace('<reference-from-from-Simulating-"Process-a-Payment">', payment["reference"])
    shell(heredoc, gateway_port, workdir, write_out=False)
