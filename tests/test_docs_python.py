"""The Python usage the docs show works against the current code.

Sources: README.md, docs/*.md, the model card, and the module docstrings of `shitu` and
its packages. What is checked, each failure naming the file and line:
- every `shitu.x.y` reference in a code span or block imports (a module) or resolves (an
  attribute of one), and every `from shitu.x import a, b` imports;
- Python code in the docs runs for real: ```python blocks (none at present),
  `python -c "..."` commands, and inline calls on names the doc imports with a `from
  shitu... import` span (docstrings: on the module's own names), e.g. docs/commands.md's
  `Gallery.open(path).search(vectors, k)`. Markdown calls are evaluated on the demo set
  (`shitu.demo.make_demo_set`) and a library built from its gallery with the shipped
  model; their placeholder names are bound as in `placeholders` below, and the literal
  `my_gallery` in the code is replaced by that library's path. What a call returns is
  checked where RESULT_CHECKS names its last method. A call whose name or argument has no
  placeholder fails until one is added. Checked statically instead (the callable exists
  and its signature takes the arguments shown, with a `self` for instance methods):
  `shitu.x.f(...)` calls (docs/commands.md's `shitu.runtime.keep_freed_memory()` would change the
  test process's allocator), `Class.method(...)` of an instance method, and docstring
  calls (`load_detector(path)`, `Detector.detect(image)`: no detector file here);
- `shitu.__version__` is the project's version, and each package's `__all__` lists only
  names that exist.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shitu

REPO_ROOT = Path(__file__).resolve().parent.parent
SRC = REPO_ROOT / "src" / "shitu"
MARKDOWN = [
    REPO_ROOT / "README.md",
    *sorted((REPO_ROOT / "docs").glob("*.md")),
    SRC / "assets" / "MODEL_CARD.md",
]
PACKAGE_INITS = sorted(SRC.glob("*/__init__.py"))
DOCSTRING_MODULES = [SRC / "__init__.py", *PACKAGE_INITS]
# The library placeholder name in README's snippets, replaced by the test library's path.
LIBRARY_PLACEHOLDER = "my_gallery"

FENCE = re.compile(r"^\s*```(\w*)\s*$")
CODE_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
DOTTED = re.compile(r"(?<![\w/.-])shitu(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^from (shitu(?:\.\w+)*) import ([\w, ]+)$")
PYTHON_C = re.compile(r"""python3? -c\s+(["'])(.+?)\1""", re.S)


@dataclass(frozen=True)
class Snippet:
    path: str  # relative to the repository
    line: int
    code: str  # newlines inside a code span joined into single spaces
    kind: str  # "span", "block" (fenced, with its language) or "python -c"
    language: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code}"


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _spans(text: str, path: str, first_line: int) -> Iterator[Snippet]:
    for match in CODE_SPAN.finditer(text):
        line = first_line + text.count("\n", 0, match.start())
        code = re.sub(r"\s*\n\s*", " ", match.group(1)).strip()
        yield Snippet(path, line, code, "span")


def markdown_snippets(path: Path) -> list[Snippet]:
    """Code spans (outside fenced blocks) and fenced blocks, with their first line."""
    rel, lines = _relative(path), path.read_text().splitlines()
    found: list[Snippet] = []
    prose: list[str] = []  # fenced lines blanked, so span line numbers stay right
    block: list[str] | None = None
    language, start = "", 0
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block, language, start = [], fence.group(1), number + 1
            prose.append("")
        elif block is not None and fence:
            found.append(Snippet(rel, start, "\n".join(block), "block", language))
            block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return found + list(_spans("\n".join(prose), rel, 1))


def docstring_snippets(path: Path) -> list[Snippet]:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False)
    if doc is None:
        return []
    return list(_spans(doc, _relative(path), tree.body[0].lineno))


def module_of(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL_MARKDOWN = {_relative(p): markdown_snippets(p) for p in MARKDOWN}
ALL_DOCSTRINGS = {_relative(p): docstring_snippets(p) for p in DOCSTRING_MODULES}
ALL_SNIPPETS = [s for group in (*ALL_MARKDOWN.values(), *ALL_DOCSTRINGS.values()) for s in group]


def resolve_dotted(name: str) -> Any:
    """The module or attribute a dotted `shitu.x.y` names; AssertionError if none."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not name.startswith(exc.name):  # a dependency is missing
                raise
            continue
        for i, attr in enumerate(parts[cut:], cut):
            if not hasattr(obj, attr):
                raise AssertionError(f"{'.'.join(parts[:i])} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"no module {parts[0]}")


def from_imports(snippet: Snippet) -> dict[str, Any]:
    """The names a `from shitu... import ...` span imports (empty for other spans)."""
    match = FROM_IMPORT.match(snippet.code)
    if not match:
        return {}
    module = importlib.import_module(match.group(1))
    names = [n.strip() for n in match.group(2).split(",") if n.strip()]
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise AssertionError(f"{snippet}: {match.group(1)} has no {', '.join(missing)}")
    return {n: getattr(module, n) for n in names}


# ---- references -------------------------------------------------------------------------


DOTTED_REFERENCES = sorted(
    {(s.path, s.line, name) for s in ALL_SNIPPETS for name in DOTTED.findall(s.code)}
)
IMPORT_SPANS = [s for s in ALL_SNIPPETS if FROM_IMPORT.match(s.code)]


def test_docs_name_shitu_references():
    assert DOTTED_REFERENCES, "no `shitu.x` reference found: is the span parser broken?"
    failures = []
    for path, line, name in DOTTED_REFERENCES:
        try:
            resolve_dotted(name)
        except (AssertionError, ImportError) as exc:
            failures.append(f"{path}:{line}: `{name}`: {exc}")
    assert not failures, "\n".join(failures)


def test_docs_from_imports_import():
    assert IMPORT_SPANS, "no `from shitu... import` span found: is the span parser broken?"
    failures = []
    for snippet in IMPORT_SPANS:
        try:
            from_imports(snippet)
        except (AssertionError, ImportError) as exc:
            failures.append(str(exc) if str(snippet) in str(exc) else f"{snippet}: {exc}")
    assert not failures, "\n".join(failures)


def test_version_and_all():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert shitu.__version__ == project["version"]
    failures = []
    for path in PACKAGE_INITS:
        module = importlib.import_module(module_of(path))
        for name in getattr(module, "__all__", []):
            if not hasattr(module, name):
                failures.append(f"{_relative(path)}: __all__ names {name!r}, which it lacks")
    assert not failures, "\n".join(failures)


def test_help_describes_every_public_name_and_method():
    """`help(Recognizer)` and the like: each name a package exports, and each public method
    of an exported class, says what it does (a docstring, its own or inherited)."""
    missing = []
    for path in PACKAGE_INITS:
        module = importlib.import_module(module_of(path))
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if not callable(value):
                continue
            if not inspect.getdoc(value):
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(value):
                missing += [
                    f"{module.__name__}.{name}.{attr}"
                    for attr, member in inspect.getmembers(value)
                    if not attr.startswith("_")
                    and callable(member)
                    and getattr(member, "__module__", "").startswith("shitu")
                    and not inspect.getdoc(member)
                ]
    assert not missing, "no docstring: " + ", ".join(missing)


def test_the_package_says_it_is_typed():
    """PEP 561: without the `py.typed` marker in the installed package, mypy and pyright
    ignore every type hint of the API a user's code calls."""
    assert (SRC / "py.typed").is_file()
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in package_data["package-data"]["shitu"]


# ---- Python code that runs ---------------------------------------------------------------


def _namespace(path: str) -> dict[str, Any]:
    """Names a doc's calls may use: its `from shitu` spans' names, or the module's own."""
    if path in ALL_DOCSTRINGS:
        return {"shitu": shitu, **vars(importlib.import_module(module_of(REPO_ROOT / path)))}
    names: dict[str, Any] = {"shitu": shitu}
    for snippet in ALL_MARKDOWN[path]:
        with contextlib.suppress(AssertionError, ImportError):  # test_docs_from_imports_import
            names.update(from_imports(snippet))
    return names


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _call_spans() -> list[tuple[Snippet, ast.Expression]]:
    """Inline code that is a call on a name the doc has from shitu."""
    calls = []
    for snippet in ALL_SNIPPETS:
        if snippet.kind != "span" or FROM_IMPORT.match(snippet.code):
            continue
        try:
            tree = ast.parse(snippet.code, mode="eval")
        except SyntaxError:
            continue
        if not any(isinstance(n, ast.Call) for n in ast.walk(tree)):
            continue
        if _root_name(tree.body) in _namespace(snippet.path):
            calls.append((snippet, tree))
    return calls


CALL_SPANS = _call_spans()
PYTHON_BLOCKS = [s for s in ALL_SNIPPETS if s.kind == "block" and s.language in ("python", "py")]
PYTHON_C_CODE = [
    Snippet(s.path, s.line + s.code.count("\n", 0, m.start()), m.group(2), "python -c")
    for s in ALL_SNIPPETS
    if s.kind == "span" or s.language in ("bash", "sh", "")
    for m in PYTHON_C.finditer(s.code)
    if "shitu" in m.group(2)
]


def test_doc_python_was_found():
    # The docs' Recognizer and Gallery calls at least; zero means the collection broke.
    assert len(CALL_SPANS) >= 2, [str(s) for s, _ in CALL_SPANS]
    assert PYTHON_C_CODE, "README's `python -c` (default_model_dir) not found"


@dataclass
class DemoLibrary:
    images: Path
    library: Path
    queries: list[tuple[Path, str]]  # single-product photos and their labels


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoLibrary:
    from shitu.cli.main import main as shitu_main
    from shitu.demo import make_demo_set

    root = tmp_path_factory.mktemp("docs-python")
    demo_set = make_demo_set(root / "images")
    library = root / "library"
    args = ["index", "build", "--gallery", str(demo_set.gallery_list), "--out", str(library)]
    assert shitu_main(args) == 0
    queries = []
    for line in demo_set.queries_list.read_text().splitlines():
        name, label = line.split("\t")
        queries.append((demo_set.queries_list.parent / name, label))
    return DemoLibrary(root / "images", library, queries)


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def placeholders(demo: DemoLibrary) -> Iterator[dict[str, Any]]:
    """Values for the free names of the docs' Python calls."""
    from shitu.index import Gallery
    from shitu.inference import FeatureExtractor, default_model_dir

    extractor = FeatureExtractor.load(default_model_dir())
    gallery = Gallery.open(demo.library, embedder=extractor)
    photos = [_rgb(path) for path, _ in demo.queries[:2]]
    values = {
        "rgb_array": photos[0],  # an RGB uint8 HxWx3 photo of demo.queries[0]'s product
        "path": str(demo.library),  # `Gallery.open(path)`
        "vectors": extractor.extract_images(photos),  # features of demo.queries[:2]
        "k": 3,
        "extractor": extractor,  # `Recognizer(extractor, gallery)`
        "gallery": gallery,
    }
    yield values
    gallery.close()


def _check_recognize(result: Any, demo: DemoLibrary) -> None:
    from shitu.pipeline import Recognition

    assert isinstance(result, list) and result, f"expected recognitions, got {result!r}"
    assert all(isinstance(r, Recognition) for r in result), result
    assert result[0].label == demo.queries[0][1], result
    scores = [r.score for r in result]
    assert scores == sorted(scores, reverse=True), "not best score first"


def _check_search(result: Any, demo: DemoLibrary) -> None:
    from shitu.index import SearchResult

    assert isinstance(result, SearchResult), type(result)
    assert result.labels.shape == result.scores.shape == result.ids.shape == (2, 3)
    assert list(result.labels[:, 0]) == [label for _, label in demo.queries[:2]]


# What a call returns, by its last method's name: as the doc's prose describes it.
RESULT_CHECKS: dict[str, Callable[[Any, DemoLibrary], None]] = {
    "recognize": _check_recognize,
    "search": _check_search,
}


def _instance_method_call(tree: ast.Expression, namespace: dict[str, Any]) -> Any:
    """For `Class.method(...)` with `method` an instance method: the function, else None."""
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
        return None
    owner = call.func.value
    if not (isinstance(owner, ast.Name) and inspect.isclass(namespace.get(owner.id))):
        return None
    cls = namespace[owner.id]
    raw = inspect.getattr_static(cls, call.func.attr, None)
    return raw if inspect.isfunction(raw) else None


def _check_signature(snippet: Snippet, tree: ast.Expression, namespace: dict[str, Any]) -> None:
    """The call's callable exists and takes the arguments shown (values not evaluated)."""
    call = tree.body
    assert isinstance(call, ast.Call), f"{snippet}: not a single call, cannot check statically"
    method = _instance_method_call(tree, namespace)
    if method is None and _root_name(call) == "shitu":
        func = resolve_dotted(ast.unparse(call.func))
        signature, args = inspect.signature(func), []
    elif method is None:
        func = eval(compile(ast.Expression(call.func), snippet.path, "eval"), dict(namespace))
        signature, args = inspect.signature(func), []
    else:
        signature, args = inspect.signature(method), [object()]  # self
    args += [object() for _ in call.args]
    kwargs = {kw.arg: object() for kw in call.keywords if kw.arg}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise AssertionError(f"{snippet}: {exc}") from None


def _last_method(tree: ast.Expression) -> str | None:
    call = tree.body
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


@pytest.mark.parametrize(
    ("snippet", "tree"), CALL_SPANS, ids=[f"{s.path}:{s.line}" for s, _ in CALL_SPANS]
)
def test_doc_call_works(snippet: Snippet, tree: ast.Expression, demo, placeholders):
    namespace = _namespace(snippet.path)
    static = (
        snippet.path in ALL_DOCSTRINGS
        or _root_name(tree.body) == "shitu"
        or _instance_method_call(tree, namespace) is not None
    )
    if static:
        _check_signature(snippet, tree, namespace)
        return
    free = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(namespace)
    missing = free - set(placeholders)
    assert not missing, f"{snippet}: no placeholder for {sorted(missing)}: add one"
    code = snippet.code.replace(LIBRARY_PLACEHOLDER, str(demo.library))
    try:
        result = eval(compile(code, snippet.path, "eval"), {**namespace, **placeholders})
    except Exception as exc:
        raise AssertionError(f"{snippet}: {type(exc).__name__}: {exc}") from exc
    try:
        check = RESULT_CHECKS.get(_last_method(tree) or "")
        if check is not None:
            check(result, demo)
    except AssertionError as exc:
        raise AssertionError(f"{snippet}: returned something else: {exc}") from exc
    finally:
        if hasattr(result, "close") and result is not placeholders["gallery"]:
            result.close()
    # README: a Recognizer built from parts leaves the gallery it was given open.
    placeholders["gallery"].search(placeholders["vectors"], 1)


@pytest.mark.parametrize(
    "snippet", PYTHON_C_CODE, ids=[f"{s.path}:{s.line}" for s in PYTHON_C_CODE]
)
def test_doc_python_c_runs(snippet: Snippet):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(snippet.code, snippet.path, "exec"), {})
    except Exception as exc:
        raise AssertionError(f"{snippet}: {type(exc).__name__}: {exc}") from exc


def test_doc_python_blocks_run(demo, placeholders):
    """```python blocks run as they are (placeholders bound, `my_gallery` replaced)."""
    for snippet in PYTHON_BLOCKS:
        code = snippet.code.replace(LIBRARY_PLACEHOLDER, str(demo.library))
        try:
            exec(compile(code, snippet.path, "exec"), dict(placeholders))
        except Exception as exc:
            raise AssertionError(
                f"{snippet.path}:{snippet.line}: {type(exc).__name__}: {exc}"
            ) from exc
