"""The documentation is checked like code: every python block of README.md and docs/**/*.md runs
(one namespace per page, in a fresh temporary directory) and shows the output it prints now; every
shell command names a real flag, script or make target; every relative link and #anchor resolves;
the README stays short."""

import contextlib
import io
import re
import shlex
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import build  # noqa: E402  (docs/build.py)
import notebooks  # noqa: E402  (docs/notebooks.py)

from minilora.cli import build_parser  # noqa: E402

PAGES = build.pages()
README_LINES = 300


def page_params(pages=PAGES):
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in pages]


# ---------------------------------------------------------------------------- python blocks
COURSE = set(notebooks.PAGES.values())  # run as notebooks, output checked, by tests/test_notebooks.py


@pytest.mark.parametrize("page", page_params([p for p in PAGES if build.runs(p) and p not in COURSE]))
def test_python_blocks_run_and_show_what_they_print(page):
    text = page.read_text()
    name = str(page.relative_to(ROOT))
    rendered = build.render(text, name)  # runs every block; a failing block or check raises here
    assert rendered == text, f"{name} shows stale output: run `python docs/build.py {name}`"


CODE_LANGS = {"python", "output", "bash", "sh", "text", "json", ""}


@pytest.mark.parametrize("page", page_params())
def test_code_blocks_say_their_language_and_use_the_public_api(page):
    for fence in build.fences(page.read_text()):
        where = f"{page.relative_to(ROOT)}:{fence.line}"
        assert fence.lang in CODE_LANGS, f"{where}: ```{fence.lang}: the tests run ```python and check ```bash"
        if fence.lang == "python":  # private names stay out of the docs (an internal is named in a comment)
            private = re.findall(r"from minilora[\w.]* import .*\b_[a-z]\w*|minilora\.[\w.]*\._[a-z]", fence.code)
            assert not private, f"{where}: private names {private}"


# ---------------------------------------------------------------------------- shell blocks
def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, `VAR=value` prefixes
    and `&&` / `;` / `|` chains split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in words + [";"]:
            if word in ("&&", ";", "|", "||"):
                while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def check_minilora(args: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"`minilora {' '.join(args)}` does not parse: {err.getvalue().strip()}"


def check_repository_file(path: str) -> None:
    assert (ROOT / path.split("::")[0]).exists(), f"{path} is not a file of the repository"


def check_command(argv: list[str]) -> None:
    program = Path(argv[0]).name
    if program == "minilora":
        return check_minilora(argv[1:])
    if program == "make":
        for target in (a for a in argv[1:] if not a.startswith("-") and "=" not in a):
            assert target in make_targets(), f"`make {target}`: no such target in the Makefile"
        return None
    if program in ("python", "python3", "torchrun"):
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":  # the docs write torchrun's flags as --x=y
            rest = rest[1:]
        assert rest, f"`{' '.join(argv)}`: no script or module"
        if rest[0] == "-m":
            module, args = rest[1], rest[2:]
            if module == "minilora.cli":
                return check_minilora(args)
            if module == "pytest":
                return check_command(["pytest", *args])
            raise AssertionError(f"`{' '.join(argv)}`: the docs run minilora.cli or pytest as modules")
        return check_repository_file(rest[0])
    if program == "pytest":
        for arg in argv[1:]:
            if arg.endswith(".py") or "::" in arg or arg.startswith("tests/"):
                check_repository_file(arg)
        return None
    raise AssertionError(f"`{' '.join(argv)}`: a command the docs test does not know; teach tests/test_docs.py")


@pytest.mark.parametrize("page", page_params())
def test_shell_commands_name_real_flags_scripts_and_targets(page):
    for fence in build.fences(page.read_text()):
        if fence.lang in ("bash", "sh"):
            for argv in shell_commands(fence.code):
                try:
                    check_command(argv)
                except AssertionError as e:
                    raise AssertionError(f"{page.relative_to(ROOT)}:{fence.line}: {e}") from None


def test_the_shell_check_reads_commands_as_a_shell_does():
    code = "OMP_NUM_THREADS=1 minilora finetune --steps 2 \\\n    --out runs/x  # a comment\nmake test && make finetune\n"
    assert shell_commands(code) == [["minilora", "finetune", "--steps", "2", "--out", "runs/x"], ["make", "test"],
                                    ["make", "finetune"]]
    check_command(["torchrun", "--nproc_per_node=2", "-m", "minilora.cli", "finetune", "--parallel", "fsdp"])
    for wrong in (["minilora", "finetune", "--no-such-flag"], ["make", "no-such-target"],
                  ["python", "benchmarks/no_such_script.py"], ["minilora", "export", "--model", "m"]):
        with pytest.raises(AssertionError):
            check_command(wrong)


# ---------------------------------------------------------------------------- links
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str, inline_code: bool = False) -> str:
    """The text outside fenced blocks, and outside inline code unless `inline_code` (what is left out
    is blanked, lines kept)."""
    for fence in reversed(build.fences(text)):
        block = text[fence.start:fence.end]
        text = text[:fence.start] + re.sub(r"[^\n]", " ", block) + text[fence.end:]
    return text if inline_code else INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lowercased, punctuation dropped (hyphens and
    underscores kept, letters of any script kept), spaces to hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(prose(page.read_text(), inline_code=True)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", page.read_text()))
    return found


def links(page: Path) -> list[tuple[int, str]]:
    text = prose(page.read_text())
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", page_params())
def test_links_and_anchors_resolve(page):
    broken = []
    for line, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not fetched
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"line {line}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"line {line}: {target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_anchors_follow_github_s_rules(tmp_path):
    assert slug("Fused layers, and MoE: `q_proj` → 4 bits") == "fused-layers-and-moe-q_proj--4-bits"
    assert slug("PiSSA / OLoRA starts") == "pissa--olora-starts"
    assert slug("Écrire α·β, [a link](x.md)") == "écrire-αβ-a-link"
    page = tmp_path / "p.md"
    page.write_text("# Set up\n## Set up\n```\n# not a heading\n```\n## Set up\n## `--pack` rows\n")
    assert anchors(page) == {"set-up", "set-up-1", "set-up-2", "--pack-rows"}


# ---------------------------------------------------------------------------- the README, the figures
def test_the_readme_is_short_and_links_every_docs_page():
    readme = build.README.read_text()
    assert readme.count("\n") <= README_LINES, f"README.md has {readme.count(chr(10))} lines; keep it ≤ {README_LINES}"
    index = (ROOT / "docs" / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name}" in index, f"docs/README.md does not link {page.name}"
            assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_the_figures_are_drawn_by_the_script(tmp_path):
    build.figures(tmp_path)
    for name in ("nf4_levels.png", "delta_w.png", "fused_qkv.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{name}" in build.TUTORIAL.read_text()


def test_the_build_keeps_indentation_and_rewrites_outputs():
    text = "# t\n\n- item:\n\n  ```python\n  print(1 + 1)\n  ```\n  ```output\n  3\n  ```\n\n```python\nx = 2\n```\n"
    assert build.render(text, "t.md") == text.replace("  3\n", "  2\n")
    assert [code for code, _ in build.run_blocks(text, "t.md")] == ["print(1 + 1)\n", "x = 2\n"]
