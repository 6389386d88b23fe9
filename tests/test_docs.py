"""The documentation site builds with every Sphinx warning treated as an error (as CI builds it)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_vae

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def docs_build(tmp_path_factory):
    """One Sphinx HTML build for the whole module: the completed process and the output folder."""
    html = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(html)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result, html


def test_docs_build_without_warnings(docs_build):
    result, html = docs_build
    assert result.returncode == 0, result.stderr[-5000:]
    assert (html / "api.html").exists()


def test_theory_page_loads_mathjax_from_the_build_not_a_cdn(docs_build):
    result, html = docs_build
    theory = html / "theory.html"
    assert theory.exists(), result.stderr[-5000:]
    page = theory.read_text(encoding="utf-8")

    remote = [url for url in re.findall(r"""https?://[^\s"'<>]+""", page) if "mathjax" in url.lower()]
    assert not remote, f"the theory page loads MathJax over the network: {remote}"

    sources = re.findall(r"""<script\b[^>]*\bsrc=["']([^"']+)["']""", page)
    mathjax = [src for src in sources if "mathjax" in src.lower()]
    assert mathjax, f"no MathJax script on the theory page; scripts: {sources}"
    for src in mathjax:
        path = src.split("?", 1)[0].split("#", 1)[0]
        assert not re.match(r"^([a-z][a-z0-9+.-]*:)?//", path, re.IGNORECASE), src
        assert path.startswith("_static/"), src
        script = html / path
        assert script.is_file() and script.stat().st_size > 0, f"{src} is not in the build output"
        if "chtml" in script.name:  # the CommonHTML output fetches its web fonts relative to the script
            assert list((script.parent / "output" / "chtml" / "fonts").rglob("*.woff")), src


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_the_snippets_driving_a_vae_with_pyros_own_tools_run_as_printed(page, small_mnist):
    """The blocks that take the library's VAE to Pyro's SVI and Predictive, with the page's ``vae`` and ``data``."""
    blocks = [block for block in python_blocks(DOCS.parent / page) if "from pyro.infer import" in block]
    assert blocks, f"{page} has no snippet with Pyro's own tools"
    for block in blocks:
        vae = small_vae()
        before = [parameter.detach().clone() for parameter in vae.parameters()]
        exec(block, {"vae": vae, "data": small_mnist})  # noqa: S102 (the page's own code)
        # SVI's step trained the library's own modules: pyro.module put each of their parameters in Pyro's store
        assert all(not torch.equal(old, new) for old, new in zip(before, vae.parameters(), strict=True))
