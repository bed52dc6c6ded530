"""The examples in the docstrings run as written."""

import doctest

import numpy as np
import pytest

import kvcore
from kvcore import _core, cache, config, groups


@pytest.mark.parametrize("module", [_core, config, cache, groups], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    globs = {"np": np, **{name: getattr(kvcore, name) for name in kvcore.__all__}}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
