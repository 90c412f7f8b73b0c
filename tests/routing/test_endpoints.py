"""A provider's endpoint as stored: protocol and prices id from models.yaml to the database, the
router, the meter's price lookup, the admin and back out through export_models."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from routing.models import ProviderEndpoint, RoutingPolicy
from routing.router import router
from usage.prices import genai_provider_id, register_prices_id

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _baseline_prices_ids() -> Iterator[None]:
    # The prices ids are process-wide (usage.prices): what a test registers must not price
    # the calls of the tests after it.
    yield
    register_prices_id("glm", "zai")
    router.invalidate()


def baseline() -> dict[str, Any]:
    return yaml.safe_load(Path(settings.AUTOPACK_MODELS_FILE).read_text())


def import_file(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    call_command("import_models", str(path), stdout=io.StringIO())


def test_the_baseline_endpoints_carry_their_protocol_and_prices_id() -> None:
    stored = {
        e.name: (e.protocol, e.prices_id)
        for e in ProviderEndpoint.objects.all()  # seeded from config/models.yaml
    }
    assert stored == {
        "openai": ("openai", "openai"),
        "anthropic": ("anthropic", "anthropic"),
        "google_gemini": ("gemini", "google"),
        "glm": ("zai", "zai"),
    }


def test_another_compatible_server_is_one_models_yaml_entry(tmp_path: Path) -> None:
    data = baseline()
    data["providers"]["local_vllm"] = {
        "protocol": "openai_compatible",
        "prices_id": "openrouter",
        "api_key_env": "LOCAL_VLLM_KEY",
        "base_url": "http://127.0.0.1:8000/v1",
    }
    data["models"]["qwen3-coder"] = "local_vllm"
    import_file(tmp_path, data)

    router.invalidate()
    endpoint = router.state().providers["local_vllm"]
    assert (endpoint.protocol, endpoint.prices_id) == ("openai_compatible", "openrouter")
    # Loading the router registered the prices id for the meter.
    assert genai_provider_id("local_vllm") == "openrouter"

    out = tmp_path / "out.yaml"
    call_command("export_models", "-o", str(out), stdout=io.StringIO())
    exported = yaml.safe_load(out.read_text())["providers"]["local_vllm"]
    assert (exported["protocol"], exported["prices_id"]) == ("openai_compatible", "openrouter")


def test_a_file_without_protocols_keeps_working_with_the_default_protocols(
    tmp_path: Path,
) -> None:
    data = baseline()
    for entry in data["providers"].values():
        entry.pop("protocol", None)
        entry.pop("prices_id", None)
    import_file(tmp_path, data)
    stored = dict(ProviderEndpoint.objects.values_list("name", "protocol"))
    assert stored == {
        "openai": "openai",
        "anthropic": "anthropic",
        "google_gemini": "gemini",
        "glm": "zai",
    }
    assert ProviderEndpoint.objects.get(name="glm").prices_id == "zai"


def test_an_unknown_protocol_is_refused_naming_the_key_and_nothing_changes(
    tmp_path: Path,
) -> None:
    data = baseline()
    data["providers"]["glm"]["protocol"] = "glm"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    before = list(ProviderEndpoint.objects.values())
    with pytest.raises(Exception, match=r"providers\.glm\.protocol: unknown protocol 'glm'"):
        call_command("import_models", str(path), stdout=io.StringIO())
    assert list(ProviderEndpoint.objects.values()) == before


@pytest.fixture
def admin_client_() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_the_admin_shows_and_edits_protocol_and_prices_id(admin_client_: Client) -> None:
    glm = ProviderEndpoint.objects.get(name="glm")
    listing = admin_client_.get(reverse("admin:routing_providerendpoint_changelist"))
    assert listing.status_code == 200 and "zai" in listing.content.decode()
    version = RoutingPolicy.objects.get().version

    url = reverse("admin:routing_providerendpoint_change", args=[glm.pk])
    page = admin_client_.get(url)
    assert page.status_code == 200 and 'value="openai_compatible"' in page.content.decode()
    response = admin_client_.post(url, {"protocol": "openai_compatible", "prices_id": "zhipuai"})

    assert response.status_code == 302
    glm.refresh_from_db()
    assert (glm.protocol, glm.prices_id, glm.base_url) == (
        "openai_compatible",
        "zhipuai",
        "https://api.z.ai/api/paas/v4",
    )
    assert RoutingPolicy.objects.get().version == version + 1  # every router reloads
    router.invalidate()
    assert router.state().providers["glm"].protocol == "openai_compatible"
    assert genai_provider_id("glm") == "zhipuai"


def test_the_admin_refuses_an_unknown_protocol(admin_client_: Client) -> None:
    glm = ProviderEndpoint.objects.get(name="glm")
    url = reverse("admin:routing_providerendpoint_change", args=[glm.pk])
    response = admin_client_.post(url, {"protocol": "grpc", "prices_id": ""})
    assert response.status_code == 200
    assert "protocol" in response.context["adminform"].form.errors
    glm.refresh_from_db()
    assert glm.protocol == "zai"
