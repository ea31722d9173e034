"""The web page's routes on a fake gateway: the page and its two files load without a key,
from this gateway alone (its Content-Security-Policy), nothing else under ``/ui`` is served,
and the fleet's data asks for a key."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.fake_gateway import Served


@pytest.mark.parametrize(
    ("path", "media_type"),
    [("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")],
)
def test_the_page_and_its_files_load_without_a_key_from_this_gateway_only(
    served: Callable[..., Served], path: str, media_type: str
) -> None:
    client = served(require_keys=True).client
    answer = client.get(path)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith(media_type)
    assert answer.headers["content-security-policy"].startswith("default-src 'self'")
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_the_page_fetches_nothing_from_another_site(served: Callable[..., Served]) -> None:
    client = served().client
    html = client.get("/ui").text
    linked = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert linked == ["/ui/style.css", "/ui/app.js"]
    for path in ("/ui", "/ui/app.js", "/ui/style.css"):
        assert not re.search(r"https?://", client.get(path).text), path


def test_no_other_file_is_served_under_ui(served: Callable[..., Served]) -> None:
    client = served().client
    for name in ("index.html", "settings.py"):
        answer = client.get(f"/ui/{name}")
        assert answer.status_code == 404
        assert answer.json() == {"error": f"no such file of the page: {name!r}"}
    assert client.get("/ui/..%2Fapp.py").status_code == 404


def test_the_fleet_view_asks_for_a_key(served: Callable[..., Served]) -> None:
    client = served(require_keys=True).client
    answer = client.get("/ui/api/fleet")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert "no API key" in answer.json()["error"]
