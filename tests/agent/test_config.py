"""Flags, sizes, label selectors and pod selection: pure functions, plus the CLI's answer to
bad flags (no root needed)."""
from __future__ import annotations

import subprocess

import pytest

from memsnap.agent.config import Selection, parse_listen, parse_size
from memsnap.agent.pods import PodMeta, matches, parse_selector, selected
from memsnap.errors import UsageError

from .conftest import AGENT


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("16Gi", 16 << 30), ("512Mi", 512 << 20), ("1.25G", 1.25e9), ("10k", 10_000),
    ("2MiB", 2 << 20), ("0", 0)])
def test_sizes(text, expected):
    assert parse_size(text, "--x") == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "5 parsecs"])
def test_bad_sizes(text):
    with pytest.raises(UsageError, match="--x"):
        parse_size(text, "--x")


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9650") == ("127.0.0.1", 9650)
    assert parse_listen(":9650") == ("0.0.0.0", 9650)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("9650", "host:", "host:port", "host:70000"):
        with pytest.raises(UsageError):
            parse_listen(bad)


@pytest.mark.parametrize("selector, labels, expected", [
    ("app=cart", {"app": "cart"}, True),
    ("app==cart", {"app": "web"}, False),
    ("app!=cart", {}, True),
    ("app!=cart", {"app": "cart"}, False),
    ("tier", {"tier": "x"}, True),
    ("!tier", {"tier": "x"}, False),
    ("app in (cart, web),tier notin (frontend)", {"app": "web", "tier": "backend"}, True),
    ("app in (cart, web),tier notin (frontend)", {"app": "web", "tier": "frontend"}, False),
    ("app.kubernetes.io/name=db, env", {"app.kubernetes.io/name": "db", "env": "prod"}, True),
    ("app.kubernetes.io/name=db, env", {"app.kubernetes.io/name": "db"}, False),
])
def test_label_selectors(selector, labels, expected):
    assert matches(parse_selector(selector), labels) is expected


@pytest.mark.parametrize("bad", ["app=(", "=x", "app in cart", "a,,b"])
def test_bad_label_selectors(bad):
    with pytest.raises(ValueError):
        parse_selector(bad)


def test_selection_by_namespace_label_and_annotation():
    meta = PodMeta("u", "shop", "cart-0", {"app": "cart"}, {"memsnap.io/track": "true"})
    assert selected(Selection(), None) == (True, "")  # track all: no API needed
    assert selected(Selection(namespaces=["shop"]), None) == (False, "no-metadata")
    assert selected(Selection(namespaces=["shop", "db"]), meta) == (True, "")
    assert selected(Selection(namespaces=["db"]), meta) == (False, "namespace")
    assert selected(Selection(label_selector="app=web"), meta) == (False, "selector")
    assert selected(Selection(annotation="memsnap.io/track"), meta) == (True, "")
    assert selected(Selection(annotation="memsnap.io/track=false"), meta) == (False, "annotation")


@pytest.mark.parametrize("flags, message", [
    (["--interval", "0"], "--interval must be a positive number"),
    (["--listen", "nowhere"], "--listen wants HOST:PORT"),
    (["--max-tracked-bytes", "lots"], "--max-tracked-bytes wants a size"),
    (["--backend", "magic"], "unknown backend"),
    (["--selector", "app in cart"], "bad label selector"),
    (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
])
def test_bad_flags_are_one_line_usage_errors(flags, message):
    result = subprocess.run([*AGENT, *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("memsnap agent: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
