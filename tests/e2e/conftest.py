"""Fixtures of the end-to-end tests: real xend daemons (see :mod:`xendtest`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from .xendtest import XendFactory


@pytest.fixture
def xends(tmp_path: Path):
    """Start daemons with ``xends.start(name, **config_overrides)``."""
    factory = XendFactory(tmp_path)
    yield factory
    problems = factory.stop_all()
    assert not problems, problems
