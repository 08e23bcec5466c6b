"""The miniature's worlds as identity ranges (issue 13): disjoint, and wired from the config to the renderer."""

from __future__ import annotations

import numpy as np
import pytest

from digi2real.config import SourceConfig
from digi2real.errors import ConfigError
from digi2real.sources import open_source, parse_source_spec
from digi2real.sources.base import SourceItem
from digi2real.sources.domains import DOMAINS, REAL_TEST, REAL_TRAIN, RENDERED_SOURCE, IdentityRange, check_disjoint
from digi2real.sources.procedural import ProceduralSource, render_item


def test_the_worlds_never_share_a_person() -> None:
    """Real training people, the rendered "DigiFace" people and the held-out test people are three disjoint ranges,
    each in the style it stands for."""
    check_disjoint(DOMAINS)
    assert (REAL_TRAIN.style, RENDERED_SOURCE.style, REAL_TEST.style) == ("real", "rendered", "real")
    for a in DOMAINS:
        for b in DOMAINS:
            if a is not b:
                assert not set(a.identities(1000)) & set(b.identities(1000))
                assert a.first not in b and a.stop - 1 not in b
    assert 0 in REAL_TRAIN and np.int64(99_999) in REAL_TRAIN and 100_000 not in REAL_TRAIN
    assert True not in REAL_TRAIN and "5" not in REAL_TRAIN


def test_overlapping_or_empty_ranges_are_refused() -> None:
    """The check names both ranges that share identities, in one line."""
    clash = IdentityRange("extra", "real", REAL_TEST.first - 5, 10)
    with pytest.raises(ConfigError, match="rendered-source .* and extra .* overlap") as info:
        check_disjoint([*DOMAINS, clash])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="count > 0"):
        check_disjoint([IdentityRange("empty", "real", 5, 0)])
    check_disjoint([IdentityRange("a", "real", 0, 10), IdentityRange("b", "real", 10, 10)])  # touching is fine


def test_a_range_hands_out_at_most_what_it_holds() -> None:
    assert REAL_TEST.identities(3) == range(200_000, 200_003)
    assert len(REAL_TRAIN.identities()) == REAL_TRAIN.count
    for n in (0, REAL_TRAIN.count + 1):
        with pytest.raises(ConfigError, match="real-train identities"):
            REAL_TRAIN.identities(n)


def test_config_builds_a_styled_source_from_a_first_identity() -> None:
    """source.style and source.first_identity reach the renderer through open_source."""
    cfg = SourceConfig(kind="procedural", identities=3, images_per_identity=2, seed=6, style="real", first_identity=5)
    src = open_source(cfg)
    assert isinstance(src, ProceduralSource)
    assert src.identities() == ["5", "6", "7"]
    assert src.list_items()[0] == SourceItem("5", "5/0.png")
    assert src.load(SourceItem("7", "7/1.png")).tobytes() == render_item(6, 7, 1, style="real").tobytes()
    # The defaults are the rendered style from identity 0, as before.
    default = open_source(SourceConfig(kind="procedural", identities=2, images_per_identity=1))
    assert (default.style, default.identities()) == ("rendered", ["0", "1"])
    assert parse_source_spec("procedural:4x2:1").style == "rendered"


def test_range_source_config_matches_the_range() -> None:
    """A range's source settings open a source over its first identities, in its style."""
    src = open_source(RENDERED_SOURCE.source_config(2, 1, seed=3))
    assert src.identities() == ["100000", "100001"]
    assert src.load(SourceItem("100001", "100001/0.png")).tobytes() == render_item(3, 100_001, 0).tobytes()
    with pytest.raises(ConfigError):
        REAL_TEST.source_config(REAL_TEST.count + 1, 1)


def test_config_refuses_an_unknown_style_or_negative_first_identity() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="style"):
        SourceConfig(kind="procedural", style="photo")
    with pytest.raises(ValidationError, match="first_identity"):
        SourceConfig(kind="procedural", first_identity=-1)
