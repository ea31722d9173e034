"""What the least-privilege worker permissions match, without a broker: the integration test
(tests/integration/test_admin.py) shows the broker and Redis enforcing them."""

from __future__ import annotations

import re

import pytest

from avocado_shared.admin import WORKER_ML_BINDINGS, WORKER_PERMISSIONS, redis_worker_rules


@pytest.mark.parametrize(
    ("kind", "name", "granted"),
    [
        ("configure", "celery@colab.celery.pidbox", True),
        ("configure", "2f0c.reply.celery.pidbox", True),
        ("configure", "celeryev.5e1a", True),
        ("configure", "ml.generate", False),
        ("configure", "ml", False),
        ("configure", "service-discovery", False),
        ("configure", "celery_delayed_3", False),
        ("configure", "ml.generate.celery.pidbox.x", False),
        ("configure", "ml.model.llama3.2:1b.batch", True),
        ("configure", "ml.model.", False),
        ("configure", "ml.dead-letter", False),
        ("read", "ml.model.qwen2.5:0.5b.interactive", True),
        ("read", "ml.generate", True),
        ("read", "infra.announce", True),
        ("read", "ml.dead-letter", False),
        ("read", "ml.generatex", False),
        ("write", "ml", True),
        ("write", "celery_delayed_27", True),
        ("write", "celery_delayed_26", False),
        ("write", "amq.default", False),
        ("write", "infra", False),
    ],
)
def test_worker_permissions(kind: str, name: str, granted: bool) -> None:
    assert bool(re.search(getattr(WORKER_PERMISSIONS, kind), name)) is granted


@pytest.mark.parametrize(
    ("key", "granted"),
    [
        ("ml.model.llama3.2:1b.batch", True),
        ("#.ml.model.llama3.2:1b.batch", True),
        ("#", False),
        ("#.ml.model.#", False),
        ("ml.model.*.batch", False),
        ("ml.generate", False),
        ("*.*", False),
    ],
)
def test_a_worker_binds_to_ml_only_with_lane_keys(key: str, granted: bool) -> None:
    assert bool(re.search(WORKER_ML_BINDINGS, key)) is granted


def test_redis_rules_keep_the_prefix_literal() -> None:
    rules = redis_worker_rules("fleet*[1]:")
    assert rules[:3] == ["~fleet\\*\\[1\\]:*", "&fleet\\*\\[1\\]:*", "-@all"]
    assert "+keys" not in rules
    assert "+flushall" not in rules
