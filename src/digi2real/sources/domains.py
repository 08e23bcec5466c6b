"""The miniature's two worlds as disjoint ranges of procedural identities (issue 13).

The paper turns DigiFace-1M's rendered identities into realistic images with a generator trained on real faces, and
evaluates a recognition model on real photographs of other people (section 3; FACTS 2). The miniature plays both
worlds with the built-in renderer (:mod:`digi2real.sources.procedural`): the ``rendered`` style stands in for
DigiFace-1M, the ``real`` style for photographs. Whoever trains, embeds or evaluates takes its people from one of the
ranges below, so no person is ever both a training identity of the real-world models and a "DigiFace" identity the
demo embeds, nor a test identity anyone trained on.

Identity ``i`` under seed ``s`` is one person in both styles; a range says which people, its ``style`` how they are
drawn where that range is used. The ranges leave room to grow (100,000 identities each) and are checked disjoint on
import.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

from digi2real.config import SourceConfig
from digi2real.errors import ConfigError

__all__ = ["DOMAINS", "REAL_TEST", "REAL_TRAIN", "RENDERED_SOURCE", "IdentityRange", "check_disjoint"]


@dataclass(frozen=True)
class IdentityRange:
    """Identities ``first`` .. ``first + count - 1`` of the procedural renderer, drawn in ``style``."""

    name: str
    style: str
    first: int
    count: int

    @property
    def stop(self) -> int:
        """One past the last identity."""
        return self.first + self.count

    def __contains__(self, identity: object) -> bool:
        """Whether an identity index (any integer type) is in the range."""
        if isinstance(identity, bool):
            return False
        try:
            i = operator.index(identity)  # type: ignore[arg-type]
        except TypeError:
            return False
        return self.first <= i < self.stop

    def identities(self, n: int | None = None) -> range:
        """The first ``n`` identities of the range (all of them by default); more than it holds is refused."""
        n = self.count if n is None else n
        if not 0 < n <= self.count:
            raise ConfigError(f"{self.name} identities: asked for {n}, the range holds 1..{self.count}; ask for fewer "
                              f"or widen {self.name} in digi2real/sources/domains.py")
        return range(self.first, self.first + n)

    def source_config(self, identities: int, images_per_identity: int, seed: int = 0) -> SourceConfig:
        """Settings of a procedural source over the first ``identities`` of the range, in its style."""
        self.identities(identities)
        return SourceConfig(kind="procedural", identities=identities, images_per_identity=images_per_identity,
                            seed=seed, style=self.style, first_identity=self.first)


#: The real world's training people: the miniature ArcFace (identity encoder) and the miniature Arc2Face (generator)
#: are trained on photographs of these (the roles of MS1MV2/WebFace and FFHQ-like data in the paper).
REAL_TRAIN = IdentityRange("real-train", "real", 0, 100_000)
#: The "DigiFace-1M" people: the rendered identities whose embeddings the demo samples and turns into realistic images.
RENDERED_SOURCE = IdentityRange("rendered-source", "rendered", 100_000, 100_000)
#: Held-out real people for evaluation pairs (the role of LFW, CFP, AgeDB...): never trained on by anything. Drawn in
#: the rendered style too when a benchmark measures the domain gap on the same people.
REAL_TEST = IdentityRange("real-test", "real", 200_000, 100_000)

DOMAINS = (REAL_TRAIN, RENDERED_SOURCE, REAL_TEST)


def check_disjoint(ranges: Iterable[IdentityRange]) -> None:
    """Raise :class:`ConfigError` naming the first two ranges that share an identity (or one that is empty)."""
    ordered = sorted(ranges, key=lambda r: r.first)
    for r in ordered:
        if r.first < 0 or r.count <= 0:
            raise ConfigError(f"identity range {r.name}: first must be >= 0 and count > 0, got {r.first}, {r.count}")
    for a, b in zip(ordered, ordered[1:]):
        if b.first < a.stop:
            raise ConfigError(f"identity ranges {a.name} ({a.first}..{a.stop - 1}) and {b.name} "
                              f"({b.first}..{b.stop - 1}) overlap; move one so that no person is in both")


check_disjoint(DOMAINS)
