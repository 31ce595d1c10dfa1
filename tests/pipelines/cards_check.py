"""What every domain's feature cards must hold after a pipeline run (shared by the domain run tests)."""

from __future__ import annotations

from pathlib import Path

from sciscope.pipelines.cards import feature_cards


def check_domain_cards(run_dir: Path, *, min_pictures: int = 1) -> None:
    """Top and control cards exist; every live feature's card has the adapter's pictures (valid PNGs)
    and no failure note; the report links the browser page."""
    cards = feature_cards(run_dir)
    assert {c.selection for c in cards} == {"top", "control"}, [c.selection for c in cards]
    for card in cards:
        failed = [n for n in card.notes if "pictures failed" in n]
        assert not failed, (card.feature, failed)
        if card.stats["density"] > 0:
            assert len(card.panels) >= min_pictures, (card.feature, card.notes)
            assert all(p.png.startswith(b"\x89PNG") and len(p.png) > 1000 for p in card.panels), card.feature
    assert 'href="features.html"' in (run_dir / "report" / "report.html").read_text()
