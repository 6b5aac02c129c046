"""The TRAKer migration snippet keeps its check against trak_fast.

docs/migrating.md holds the snippet that builds ``TrakFastProjector`` and a ``TRAKer``; the
blocks that continue it run trak's unchanged workflow on the page's own model and training
set and assert that the scores equal ``attribute(..., ensemble="trak")`` with the same seed and
``lambda_reg``, up to float32 rounding. tests/test_docs.py runs that chain as written (trak
0.3.2 is a test dependency). This file checks that the chain still does what made the snippet
trustworthy: trak's two harmful defaults overridden, ``proj_dim`` above the training set's size
(where trak's defaults give noise), and the comparison asserted, not just printed.
"""
import importlib.util
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_docs_blocks", HERE / "test_docs.py")
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)


def migration_chain():
    matching = [c for c in docs.chains() if c[0].path == "docs/migrating.md" and any(
        "TrakFastProjector(grad_dim" in b.code and "TRAKer(" in b.code for b in c)]
    assert len(matching) == 1, "docs/migrating.md must hold exactly one runnable TRAKer migration snippet"
    return matching[0]


def test_every_traker_snippet_overrides_the_harmful_defaults():
    """The README's three-line version too: no page shows TRAKer with trak's defaults."""
    snippets = [b for page in docs.PAGES for b in docs.blocks_of(page)
                if "TrakFastProjector(grad_dim" in b.code and "TRAKer(" in b.code]
    assert {b.path for b in snippets} >= {"README.md", "docs/migrating.md"}
    for b in snippets:
        assert "use_half_precision=False" in b.code, b.where
        assert float(re.search(r"lambda_reg=([0-9.e-]+)", b.code).group(1)) > 0, b.where


def test_migration_snippet_is_run_and_checked_against_attribute_trak_mode():
    chain = migration_chain()
    snippet = next(b for b in chain if "TrakFastProjector(grad_dim" in b.code)
    assert "use_half_precision=False" in snippet.code
    lam = float(re.search(r"lambda_reg=([0-9.e-]+)", snippet.code).group(1))
    proj_dim = int(re.search(r"proj_dim=(\d+)", snippet.code).group(1))
    assert lam > 0
    code = "".join(b.code for b in chain)
    n_train = int(re.search(r"n_train=(\d+)", code).group(1))
    assert proj_dim > n_train             # the case where trak's defaults give noise
    check = chain[-1].code
    assert 'ensemble="trak"' in check and f"lambda_reg={snippet.code.split('lambda_reg=')[1].split(')')[0]}" in check
    assert re.search(r"^assert error < 1e-3$", check, flags=re.M)
    assert "finalize_scores" in code       # trak's own workflow produced the scores compared
    assert all(b.requires in ([], ["trak"]) for b in chain)   # runs wherever trak is installed
