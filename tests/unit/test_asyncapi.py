"""The AsyncAPI document (services/gateway/asyncapi.json) says what is on the bus, all of it:
held against the message models and the topology both ways, and validated by the AsyncAPI
project's own parser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from pydantic import BaseModel
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from libs.common.broker.topology import Topology
from libs.common.messages import COMMANDS, EVENTS, Envelope, Payload, decode
from libs.common.states import PaymentStatus, TransitionSource

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT_PATH = ROOT / "services" / "gateway" / "asyncapi.json"
DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text())
PARSER_DIR = ROOT / "tests" / "asyncapi"
MESSAGES: dict[str, Any] = DOCUMENT["components"]["messages"]
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]
CHANNELS: dict[str, Any] = DOCUMENT["channels"]
# Not a model of its own: any command's body, as it was, with the parking headers.
PARKED = "parkedMessage"
_URI = "urn:asyncapi"
_REGISTRY: Registry[Any] = Registry().with_resource(
    _URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT7)
)


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = DOCUMENT
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return resolve(target)


def envelope_schema(message: dict[str, Any]) -> dict[str, Any]:
    return resolve(message["payload"])


def payload_schema(message: dict[str, Any]) -> dict[str, Any]:
    return resolve(envelope_schema(message)["properties"]["payload"])


def required_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, field in model.model_fields.items() if field.is_required()}


def message_of(payload_type: type[Payload]) -> dict[str, Any]:
    found = [m for m in MESSAGES.values() if m["name"] == _documented_name(payload_type)]
    assert len(found) == 1, f"{payload_type.TYPE} is documented {len(found)} times"
    return found[0]


def _documented_name(payload_type: type[Payload]) -> str:
    # An event's type is payment.<status>; its pattern is documented once.
    return payload_type.TYPE.replace("*", "<status>")


MODELS = (*COMMANDS, *EVENTS)


def test_the_parser_of_the_asyncapi_project_accepts_the_document() -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed (the CI script installs nodejs and npm)"
    assert (PARSER_DIR / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        "the AsyncAPI parser is not installed: `make test` installs it"
        " (npm ci --prefix tests/asyncapi)"
    )
    result = subprocess.run(
        [node, str(PARSER_DIR / "validate.mjs"), str(DOCUMENT_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary == {"ok": True, "version": "3.0.0", "messages": len(MESSAGES)}


def test_the_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    """The check above can fail: the same parser on a document missing a required field."""
    broken = json.loads(DOCUMENT_PATH.read_text())
    del broken["operations"]["sendPaymentEvent"]["action"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, str(PARSER_DIR / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "action" in result.stdout


@pytest.mark.parametrize("payload_type", MODELS, ids=lambda m: m.TYPE)
def test_every_message_model_is_documented_field_for_field(payload_type: type[Payload]) -> None:
    schema = payload_schema(message_of(payload_type))
    assert set(schema["properties"]) == set(payload_type.model_fields)
    assert set(schema.get("required", [])) == required_fields(payload_type)
    assert schema["additionalProperties"] is False


def test_every_documented_message_is_a_model() -> None:
    documented = {m["name"] for key, m in MESSAGES.items() if key != PARKED}
    assert documented == {_documented_name(m) for m in MODELS}


@pytest.mark.parametrize("key", sorted(set(MESSAGES) - {PARKED}))
def test_every_envelope_is_the_envelope_model(key: str) -> None:
    schema = envelope_schema(MESSAGES[key])
    assert set(schema["properties"]) == set(Envelope.model_fields)
    assert set(schema["required"]) == required_fields(Envelope)


@pytest.mark.parametrize("payload_type", MODELS, ids=lambda m: m.TYPE)
def test_every_example_is_a_valid_message_of_its_model(payload_type: type[Payload]) -> None:
    message = message_of(payload_type)
    assert message["examples"]
    pointer = "#/components/schemas/" + message["payload"]["$ref"].rsplit("/", 1)[-1]
    validator = Draft7Validator({"$ref": _URI + pointer}, registry=_REGISTRY)
    for example in message["examples"]:
        envelope = decode(json.dumps(example["payload"]).encode(), payload_type)
        assert envelope.type == envelope.payload.message_type()
        errors = [e.message for e in validator.iter_errors(example["payload"])]
        assert not errors, errors


def test_the_parked_example_is_a_command_with_the_parking_headers() -> None:
    parked = MESSAGES[PARKED]
    headers = resolve(parked["headers"])
    for example in parked["examples"]:
        assert set(example["headers"]) <= set(headers["properties"])
        decode(json.dumps(example["payload"]).encode(), COMMANDS[0])


def test_the_parking_reasons_are_those_the_consumer_gives() -> None:
    source = (ROOT / "libs" / "common" / "broker" / "consumer.py").read_text()
    given = set(re.findall(r'self\._park\(message, "([a-z_]+)"', source))
    documented = resolve(MESSAGES[PARKED]["headers"])["properties"]["x-parked-reason"]["enum"]
    assert given
    assert set(documented) == given


def test_every_status_has_its_event_and_only_those() -> None:
    statuses = [s.value for s in PaymentStatus]
    assert CHANNELS["paymentEvents"]["parameters"]["status"]["enum"] == statuses
    assert SCHEMAS["PaymentStatus"]["enum"] == statuses
    event = payload_schema(message_of(EVENTS[0]))
    assert event["properties"]["source"]["enum"] == [s.value for s in TransitionSource]


def test_the_topology_is_documented_both_ways() -> None:
    topology = Topology()
    routing = {
        c["address"]: c for c in CHANNELS.values() if c["bindings"]["amqp"]["is"] == "routingKey"
    }
    queues = {c["address"]: c for c in CHANNELS.values() if c["bindings"]["amqp"]["is"] == "queue"}
    for channel in routing.values():
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert (exchange["name"], exchange["type"], exchange["durable"]) == (
            topology.exchange,
            "topic",
            True,
        )
    assert set(routing) == {m.TYPE for m in COMMANDS} | {"payment.{status}"}
    expected_queues = {spec.name for spec in topology.queues} | {
        spec.parking for spec in topology.queues
    }
    assert set(queues) == expected_queues
    for spec in topology.queues:
        consumer = queues[spec.name]
        assert consumer["x-queue-arguments"] == topology.queue_arguments(spec)
        assert consumer["x-bound-to"] == {
            "exchange": topology.exchange,
            "routingKeys": list(spec.routing_keys),
        }
        parking = queues[spec.parking]
        assert parking["x-bound-to"] == {
            "exchange": topology.dead_letter_exchange,
            "routingKeys": [spec.name],
        }
        assert parking["x-queue-arguments"] == {"x-queue-type": "quorum"}
    # Each command's queue carries exactly that command.
    for spec in topology.queues:
        [message] = queues[spec.name]["messages"].values()
        assert resolve(message)["name"] == spec.routing_keys[0]


def test_every_operation_names_a_channel_and_its_messages() -> None:
    for name, operation in DOCUMENT["operations"].items():
        channel_key = operation["channel"]["$ref"].removeprefix("#/channels/")
        assert channel_key in CHANNELS, name
        for ref in operation["messages"]:
            assert ref["$ref"].startswith(f"#/channels/{channel_key}/messages/"), name
