"""The docs' commands are true: every `s3 ...` and `benchmarks/<script>.py ...` line in README.md and docs/*.md (in
code blocks, and in inline code in the prose) names a command that exists and only options it takes; and their
links hold: every relative link and #anchor in those files names a file and a heading that exist."""

import collections
import pathlib
import re
import shlex

import click
import pytest

from pipeline.cli import main as s3

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code may wrap onto a second line
INDENTED = re.compile(r"^(?: {4})+((?:\.venv/|s3 |python).*(?:\\\n.*)*)", re.M)  # indented code blocks' commands
SCRIPT = re.compile(r"(?:.*/)?benchmarks/(\w+)\.py$")


def command_lines(text: str):
    """Shell lines of the code blocks (continuations joined, comments dropped), then the commands of indented
    code blocks, then the prose's inline code (wrapped onto a second line or not)."""
    for block in FENCE.findall(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line
    prose = FENCE.sub("", text)
    for line in INDENTED.findall(prose):
        yield re.sub(r"\\\n\s*", " ", line).split(" #")[0].strip()
    yield from (code.replace("\n", " ") for code in INLINE.findall(prose))


def invocations(line: str):
    """(program, its arguments) for each `s3` or benchmark script a shell line runs."""
    for part in re.split(r"&&|\|\||;|\|", line):
        try:
            words = shlex.split(part)
        except ValueError:  # prose in backticks that is no shell line
            continue
        for i, word in enumerate(words):
            script = SCRIPT.match(word)
            if word == "s3" or word.endswith("/s3") or script:
                yield (script.group(1) if script else "s3"), words[i + 1:]
                break


def documented():
    found = {}
    for doc in DOCS:
        for line in command_lines(doc.read_text()):
            for program, args in invocations(line):
                found.setdefault(program, []).append((doc.name, line, args))
    return found


DOCUMENTED = documented()


def option_names(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names |= {*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())}
    return names


def check(command: click.Command, uses) -> list[str]:
    wrong = []
    for doc, line, args in uses:
        target, rest = command, list(args)
        while isinstance(target, click.Group) and rest and rest[0] in target.commands:
            target, rest = target.commands[rest[0]], rest[1:]
        if isinstance(target, click.Group):
            if rest and not rest[0].startswith("-"):
                wrong.append(f"{doc}: no command {rest[0]!r} in `{line}`")
            continue
        known = option_names(target)
        wrong += [f"{doc}: no option {w.split('=')[0]} in `{line}`" for w in rest
                  if w.startswith("--") and w.split("=")[0] not in known]  # fmt: skip
    return wrong


def test_the_docs_run_commands():
    assert len(DOCUMENTED.get("s3", [])) > 100 and len(DOCUMENTED) > 10  # the extraction still finds them


def test_every_documented_s3_command_and_option_exists():
    assert not check(s3, DOCUMENTED["s3"])


@pytest.mark.parametrize("script", sorted(set(DOCUMENTED) - {"s3"}))
def test_every_documented_benchmark_option_exists(import_benchmark, script):
    assert (ROOT / "benchmarks" / f"{script}.py").exists(), f"the docs run benchmarks/{script}.py, which is gone"
    assert not check(import_benchmark(script).main, DOCUMENTED[script])


def test_every_documented_make_target_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    used = {word for doc in DOCS for line in command_lines(doc.read_text())
            for word in re.findall(r"(?:^|&&\s*|;\s*)make ([a-z][\w-]*)", line)}  # fmt: skip
    assert used and used <= targets, used - targets


# Links: [text](target) and ![alt](target); the text may hold one level of brackets and wrap onto the next line.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)\)")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: pathlib.Path) -> set[str]:
    """Every heading's anchor in ``doc`` (outside code blocks); a repeated one gets -1, -2, ... as on GitHub."""
    seen, found = collections.Counter(), set()
    for heading in HEADING.findall(FENCED.sub("", doc.read_text())):
        name = slug(heading)
        found.add(f"{name}-{seen[name]}" if seen[name] else name)
        seen[name] += 1
    return found


def links(doc: pathlib.Path) -> list[str]:
    return LINK.findall(FENCED.sub("", doc.read_text()))


def test_the_docs_links_are_found():
    assert sum(len(links(doc)) for doc in DOCS) > 100 and len(anchors(ROOT / "docs" / "status.md")) > 5


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for target in links(doc):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no file {path}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_doc():
    linked = {target.partition("#")[0] for target in links(ROOT / "README.md")}
    assert not {f"docs/{doc.name}" for doc in DOCS[1:]} - linked
