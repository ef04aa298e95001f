"""/docs and /redoc work without the internet: their assets come from this server, and a real
headless Chromium, with every other host unresolvable, renders the operation list."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apps import live_server, make_models_dir, make_settings
from browser import dump_dom
from databases import provisioned_database

from service.app import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path]) -> Iterator[str]:
    root = tmp_path_factory.mktemp("docs")
    with provisioned_database("sqlite", root) as url:
        settings = make_settings(url, root, make_models_dir(root, artifacts, dog="dog"), warmup=False)
        with live_server(create_app(settings)) as base:
            yield base


def asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_every_asset_from_this_server(server: str, page: str) -> None:
    html = httpx.get(server + page).text
    urls = asset_urls(html)
    assert urls, html
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from elsewhere"
        response = httpx.get(server + url)
        assert response.status_code == 200, url
        assert len(response.content) > 1000, url


def test_swagger_ui_renders_every_operation_offline(server: str) -> None:
    spec = httpx.get(server + "/openapi.json").json()
    dom = dump_dom(server + "/docs")
    rendered = set(re.findall(r'data-path="([^"]+)"', dom))
    assert rendered == set(spec["paths"]), dom[-3000:]
    for path in spec["paths"].values():
        for operation in path.values():
            assert f"operations-{operation['tags'][0]}-{operation['operationId']}" in dom


def test_redoc_renders_the_operations_offline(server: str) -> None:
    spec = httpx.get(server + "/openapi.json").json()
    dom = dump_dom(server + "/redoc")
    for path in spec["paths"].values():
        for operation in path.values():
            assert f"operation/{operation['operationId']}" in dom, operation["operationId"]
