"""Every code block of README.md and docs/*.md is checked, so the docs cannot drift from the code.

How each kind of block is tested (tests/python/doc_blocks.py finds them):

- ```python: run. The blocks of a page run in order in one namespace, as a reader would type them, on CPU
  device lists (device_ids=["cpu", "cpu"]) so that they run on any machine. A hidden block, an HTML comment
  `<!-- doc-test python ... -->`, runs code the reader need not see (a model, its inputs) before the blocks
  below it. A block that truly needs CUDA is marked `<!-- doc-test: cuda -->` and is skipped where CUDA is absent.
- ```cpp: compiled, not run. tests/cpp/CMakeLists.txt writes every C++ block into one translation unit of
  torch_dp_tests (`python3 tests/python/doc_blocks.py --write-cpp ...`): a function per block, with the hidden
  `<!-- doc-test cpp ... -->` code before it; blocks of declarations (`<!-- doc-test: namespace -->`) at namespace
  scope. A broken C++ block breaks the build of the C++ tests (bash scripts/test.sh). Here: that translation unit
  is generated.
- ```bash: every command is one a reader has (bash, python, pip, cmake, ...) or a program of the repository, and
  every path of the repository a command names (scripts/..., examples/..., benchmarks/..., tests/...) exists.
- ```cmake: the package and targets it uses are the ones cmake/TorchDPConfig.cmake.in installs.
- ```text with `<!-- doc-test: layout -->`: the first column names paths that git tracks, and every tracked
  top-level folder is named. Other text blocks (diagrams) are not checked.

Besides the blocks: the index of design notes in docs/how-it-works.md must name notes that are in the files it
names, and every relative link must name a file that exists (and one of its headings, after a #). Every block
must be of one of these kinds, and the parser must find every fence of a page.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
import torch

from doc_blocks import ROOT, all_blocks, blocks, cpp_translation_unit, doc_pages

PAGES = [str(p.relative_to(ROOT)) for p in doc_pages()]
CHECKED = {"python", "cpp", "bash", "cmake", "text", "hidden-python", "hidden-cpp", "hidden-cpp-namespace"}
# Commands a reader has; anything else must be a program of the repository.
COMMANDS = {"bash", "python", "python3", "pip", "cmake", "ctest", "torchrun", "git", "cd", "export"}


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_every_block_has_a_known_kind():
    for b in all_blocks():
        assert b.lang in CHECKED, f"{b.where}: a ```{b.lang} block: use one of {sorted(CHECKED)}"
        assert b.marker in ("", "cuda", "namespace", "layout"), f"{b.where}: unknown marker {b.marker!r}"


def _run_python(page: str, cuda_block: int | None = None) -> None:
    """Runs the page's Python blocks in order in one namespace: those for every machine, or, with cuda_block,
    those before that CUDA block and then it."""
    namespace: dict = {"__name__": "__doc_test__", "__file__": str(ROOT / page)}  # the page, for hidden code
    try:
        for b in blocks(ROOT / page):
            if b.lang not in ("python", "hidden-python") or (b.marker == "cuda" and b.line != cuda_block):
                continue
            # Padded with empty lines, so that a traceback names the page and its line.
            code = compile("\n" * (b.line - 1) + b.code, str(ROOT / b.page), "exec")
            exec(code, namespace)  # a warning fails the test, as anywhere in the suite: readers would see it
            if b.line == cuda_block:
                return
    finally:
        torch_dp = namespace.get("torch_dp")
        if torch_dp is not None and torch_dp.is_patched():
            torch_dp.unpatch()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "python" for b in blocks(ROOT / p))])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the blocks write (checkpoints) land here
    _run_python(page)


CUDA_BLOCKS = [b.where for b in all_blocks() if b.lang == "python" and b.marker == "cuda"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a block marked <!-- doc-test: cuda --> needs CUDA")
@pytest.mark.parametrize("where", CUDA_BLOCKS)
def test_cuda_python_blocks_run(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page, line = where.rsplit(":", 1)
    _run_python(page, cuda_block=int(line))


def test_cpp_blocks_make_one_translation_unit():
    cpp = [b for b in all_blocks() if b.lang == "cpp"]
    assert cpp, "no C++ block found"
    unit = cpp_translation_unit()
    for b in cpp:
        assert f'#line {b.line} "{b.page}"\n{b.code}' in unit, b.where
    cmake = (ROOT / "tests" / "cpp" / "CMakeLists.txt").read_text()
    assert "doc_blocks.py" in cmake, "tests/cpp/CMakeLists.txt no longer compiles the docs' C++ blocks"


def _without_substitutions(text: str) -> str:
    """`$(...)` replaced by `SUBSTITUTION`: what it runs is Python or shell of its own, not checked here."""
    while "$(" in text:
        start = text.index("$(")
        depth, end = 0, start + 1
        for end in range(start + 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:start] + "SUBSTITUTION" + text[end + 1 :]
    return text


def _commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at ; && || |."""
    commands = []
    for line in _without_substitutions(re.sub(r"\\\n", " ", code)).split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word.strip(";&|"):
                words.append(word)
                continue
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
                words.pop(0)
            if words:
                commands.append(words)
            words = []
    return commands


def _programs() -> set[str]:
    """Programs the repository builds: examples/cpp/<name>.cpp and benchmarks/<name>.cpp."""
    return {p.stem for d in ("examples/cpp", "benchmarks") for p in (ROOT / d).glob("*.cpp")}


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "bash" for b in blocks(ROOT / p))])
def test_shell_blocks_name_what_exists(page):
    tracked = _tracked()
    folders = {f.rsplit("/", i)[0] for f in tracked for i in range(1, f.count("/") + 1)}
    programs = _programs()
    for b in blocks(ROOT / page):
        if b.lang != "bash":
            continue
        for words in _commands(b.code):
            program = words[0]
            if program not in COMMANDS and not program.startswith("./my_app/"):  # my_app: the reader's project
                name = os.path.basename(program)
                assert program.startswith(("./", "build")) and name in programs, (
                    f"{b.where}: `{' '.join(words)}`: {program} is neither a common command nor a program that "
                    f"examples/cpp or benchmarks build"
                )
            for word in words[1:]:
                path = word.split("=", 1)[-1].rstrip("/")
                if re.match(r"^(scripts|examples|benchmarks|tests|docs|cmake|python|src|include)/", path):
                    assert "*" in path or path in tracked or path in folders, (
                        f"{b.where}: `{' '.join(words)}` names {path}, which is not in the repository"
                    )


def test_cmake_blocks_use_the_installed_package():
    config = (ROOT / "cmake" / "TorchDPConfig.cmake.in").read_text() + (ROOT / "CMakeLists.txt").read_text()
    for b in all_blocks():
        if b.lang != "cmake":
            continue
        for package in re.findall(r"find_package\((\w+)", b.code):
            assert package == "TorchDP" or package in config, f"{b.where}: find_package({package})"
        for target in re.findall(r"\b(\w+::\w+)\b", b.code):
            assert target in config, f"{b.where}: {target} is not a target that TorchDP installs"


def test_layout_names_what_git_tracks():
    tracked = set(_tracked())
    folders = {f.rsplit("/", i)[0] + "/" for f in tracked for i in range(1, f.count("/") + 1)}
    layouts = [b for b in all_blocks() if b.marker == "layout"]
    assert layouts, "no layout block (<!-- doc-test: layout -->) found"
    named: set[str] = set()
    for b in layouts:
        for line in b.code.split("\n"):
            if not line.strip() or line[0] == " ":
                continue  # a description continued
            for path in re.split(r",\s*", re.split(r" {2,}", line, maxsplit=1)[0]):
                assert path in tracked or path in folders, (
                    f"{b.where}: the layout names {path}: git tracks no such path"
                )
                named.add(path.split("/")[0] + "/" if "/" in path else path)
    top = {f.split("/")[0] + "/" for f in tracked if "/" in f and not f.startswith(".")}
    missing = sorted(top - named)
    assert not missing, f"the layout leaves out the tracked folders {missing}"


def test_notes_index_points_at_the_notes():
    """The design notes listed in docs/how-it-works.md are in the files it names (a table, not a code block)."""
    index = re.findall(
        r"^\| `Note \[([^\]]+)\]` \| `([^`]+)` \|", (ROOT / "docs" / "how-it-works.md").read_text(), re.M
    )
    assert len(index) > 10, "the notes index of docs/how-it-works.md was not found"
    for note, path in index:
        assert (ROOT / path).exists(), f"docs/how-it-works.md: Note [{note}] is said to be in {path}, which is gone"
        assert f"Note [{note}]" in (ROOT / path).read_text(), f"docs/how-it-works.md: Note [{note}] is not in {path}"


def _anchors(path) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped, spaces made hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_pages_resolve():
    """Every relative link of README.md and docs/ names a file that exists, and a heading of it after a #."""
    for path in doc_pages():
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            assert linked.exists(), f"{where}: {file} does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{where}: {linked.name} has no heading with that anchor"


def test_a_broken_block_is_found(tmp_path, monkeypatch):
    """The harness itself: a Python block that raises fails, and its traceback names the page's line."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\nassert x == 2\n```\n")
    monkeypatch.setattr("doc_blocks.ROOT", tmp_path)
    (b,) = blocks(page)
    assert (b.page, b.line, b.lang) == ("page.md", 4, "python")
    with pytest.raises(AssertionError) as info:
        exec(compile("\n" * (b.line - 1) + b.code, b.page, "exec"), {})
    assert info.traceback[-1].lineno + 1 == 5


def test_blocks_are_all_found():
    """Guards the parser: a fence it missed would go untested."""
    for path in doc_pages():
        fences = sum(1 for line in path.read_text().split("\n") if line.startswith("```"))
        assert fences == 2 * sum(1 for b in blocks(path) if not b.lang.startswith("hidden")), path
