"""Sphinx configuration of the mlcl_losses documentation."""

from __future__ import annotations

import runpy
import sys
import zlib
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "src"))

import mlcl_losses  # noqa: E402

project = "mlcl_losses"
author = "mlcl_losses developers"
copyright = "2026, mlcl_losses developers"  # noqa: A001
release = mlcl_losses.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "scripts", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_mock_imports = ["faiss"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"mlcl_losses {release}"
html_static_path = ["_static"]


# --------------------------------------------------------------------------- intersphinx
# The build machines have no internet. Each project gets a small offline inventory of the
# objects these docs mention, tried first; links still point at the real documentation.
_OFFLINE = {
    "python": (
        "https://docs.python.org/3/",
        [
            ("int", "py:class", "library/functions.html#int"),
            ("float", "py:class", "library/functions.html#float"),
            ("str", "py:class", "library/stdtypes.html#str"),
            ("bool", "py:class", "library/functions.html#bool"),
            ("list", "py:class", "library/stdtypes.html#list"),
            ("dict", "py:class", "library/stdtypes.html#dict"),
            ("tuple", "py:class", "library/stdtypes.html#tuple"),
            ("ValueError", "py:exception", "library/exceptions.html#ValueError"),
            ("TypeError", "py:exception", "library/exceptions.html#TypeError"),
            ("ImportError", "py:exception", "library/exceptions.html#ImportError"),
            ("collections.abc.Sequence", "py:class", "library/collections.abc.html#collections.abc.Sequence"),
            ("collections.abc.Mapping", "py:class", "library/collections.abc.html#collections.abc.Mapping"),
            ("collections.abc.Callable", "py:class", "library/collections.abc.html#collections.abc.Callable"),
            ("typing.Literal", "py:data", "library/typing.html#typing.Literal"),
            ("typing.Any", "py:data", "library/typing.html#typing.Any"),
            ("typing.NamedTuple", "py:function", "library/typing.html#typing.NamedTuple"),
            ("enum.IntEnum", "py:class", "library/enum.html#enum.IntEnum"),
            ("logging", "py:module", "library/logging.html"),
            ("os.PathLike", "py:class", "library/os.html#os.PathLike"),
        ],
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        [
            ("torch.Tensor", "py:class", "tensors.html#torch.Tensor"),
            ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html#torch.nn.Module"),
            ("torch.device", "py:class", "tensor_attributes.html#torch.device"),
            ("torch.dtype", "py:class", "tensor_attributes.html#torch.dtype"),
            ("torch.Generator", "py:class", "generated/torch.Generator.html#torch.Generator"),
            ("torch.Size", "py:class", "size.html#torch.Size"),
            ("torch.as_tensor", "py:function", "generated/torch.as_tensor.html#torch.as_tensor"),
            ("torch.load", "py:function", "generated/torch.load.html#torch.load"),
            (
                "torch.nn.Module.state_dict",
                "py:method",
                "generated/torch.nn.Module.html#torch.nn.Module.state_dict",
            ),
            (
                "torch.nn.Module.load_state_dict",
                "py:method",
                "generated/torch.nn.Module.html#torch.nn.Module.load_state_dict",
            ),
            ("torch.distributed", "py:module", "distributed.html#module-torch.distributed"),
            (
                "torch.distributed.init_process_group",
                "py:function",
                "distributed.html#torch.distributed.init_process_group",
            ),
            ("torch.distributed.all_gather", "py:function", "distributed.html#torch.distributed.all_gather"),
            ("torch.distributed.ProcessGroup", "py:class", "distributed.html#torch.distributed.ProcessGroup"),
            (
                "torch.distributed.nn.functional.all_gather",
                "py:function",
                "distributed.html#torch.distributed.nn.functional.all_gather",
            ),
            ("torch.utils.data.Dataset", "py:class", "data.html#torch.utils.data.Dataset"),
            (
                "torch.utils.data.DistributedSampler",
                "py:class",
                "data.html#torch.utils.data.distributed.DistributedSampler",
            ),
        ],
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        [("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html#numpy.ndarray")],
    ),
    # PML's documentation is MkDocs (no Sphinx inventory): one anchor per class heading.
    "pytorch_metric_learning": (
        "https://kevinmusgrave.github.io/pytorch-metric-learning/",
        [
            (
                "pytorch_metric_learning.losses.BaseMetricLossFunction",
                "py:class",
                "losses/#basemetriclossfunction",
            ),
            ("pytorch_metric_learning.losses.CrossBatchMemory", "py:class", "losses/#crossbatchmemory"),
            ("pytorch_metric_learning.miners.BaseMiner", "py:class", "miners/#baseminer"),
            ("pytorch_metric_learning.reducers.BaseReducer", "py:class", "reducers/#basereducer"),
        ],
    ),
}


def _write_inventory(path: Path, project_name: str, entries: list[tuple[str, str, str]]) -> None:
    header = f"# Sphinx inventory version 2\n# Project: {project_name}\n# Version: offline\n"
    header += "# The remainder of this file is compressed using zlib.\n"
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in entries)
    path.write_bytes(header.encode() + zlib.compress(body.encode()))


_INV_DIR = DOCS / "_build" / "offline_inventories"
_INV_DIR.mkdir(parents=True, exist_ok=True)
intersphinx_mapping = {}
for _name, (_url, _entries) in _OFFLINE.items():
    _path = _INV_DIR / f"{_name}.inv"
    _write_inventory(_path, _name, _entries)
    intersphinx_mapping[_name] = (_url, (str(_path),))
intersphinx_timeout = 5

# --------------------------------------------------------------------------- nitpicky refs
# Autodoc writes some external classes under their private defining module (the bases of
# the PML adapters, ``torch._C.Generator`` from ``torch.Generator``'s ``__module__``) or
# as the bare name of a string annotation it could not evaluate (``Tensor``). Send those
# to the public name documented in the inventories above.
_PUBLIC_NAMES = {
    "torch._C.Generator": "torch.Generator",
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "torch.utils.data.dataset.Dataset": "torch.utils.data.Dataset",
    "Tensor": "torch.Tensor",
    "pytorch_metric_learning.losses.base_metric_loss_function.BaseMetricLossFunction": (
        "pytorch_metric_learning.losses.BaseMetricLossFunction"
    ),
    "pytorch_metric_learning.losses.cross_batch_memory.CrossBatchMemory": (
        "pytorch_metric_learning.losses.CrossBatchMemory"
    ),
    "pytorch_metric_learning.miners.base_miner.BaseMiner": "pytorch_metric_learning.miners.BaseMiner",
    "BaseMiner": "pytorch_metric_learning.miners.BaseMiner",
    "pytorch_metric_learning.reducers.base_reducer.BaseReducer": "pytorch_metric_learning.reducers.BaseReducer",
}


def _to_public_name(app: Any, env: Any, node: Any, contnode: Any) -> None:
    """Rewrite a private target to its public name; intersphinx then resolves it."""
    if node.get("refdomain") == "py" and node.get("reftarget") in _PUBLIC_NAMES:
        node["reftarget"] = _PUBLIC_NAMES[node["reftarget"]]


def setup(app: Any) -> None:
    app.connect("missing-reference", _to_public_name, priority=100)


# --------------------------------------------------------------------------- figures
# Figures are drawn by the scripts in docs/scripts (never pasted): run them on every build.
for _script in sorted((DOCS / "scripts").glob("plot_*.py")):
    runpy.run_path(str(_script), run_name="__main__")
