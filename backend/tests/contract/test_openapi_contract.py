"""The API as the app serves it must be exactly the contract in specs/ (regenerate it with
``make openapi`` when the API changes on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from chatbot.api.app import create_app
from chatbot.config import Settings

CONTRACT = (
    Path(__file__).parents[3] / "specs" / "001-lmcache-chatbot" / "contracts" / "openapi.yaml"
)


def test_the_app_serves_the_contract() -> None:
    served = json.loads(json.dumps(create_app(Settings(_env_file=None)).openapi()))
    contract = yaml.safe_load(CONTRACT.read_text())
    assert served == contract, "the API and specs/.../openapi.yaml differ: run `make openapi`"


def test_the_contract_documents_every_error_status() -> None:
    contract = yaml.safe_load(CONTRACT.read_text())
    send = contract["paths"]["/v1/conversations/{conversation_id}/messages"]["post"]
    assert {"400", "401", "404", "409", "413", "422", "429", "503"} <= set(send["responses"])
    assert "text/event-stream" in send["responses"]["200"]["content"]
