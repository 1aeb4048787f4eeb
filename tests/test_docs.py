"""The docs cannot drift from the code: every param README.md and docs/*.md name (`-S key=value`, `section.key`, YAML
snippets) exists in params.yaml and its value loads; every key of params.yaml is documented in docs/; links,
anchors, repo paths, `python -m` modules, options of our tools and `make` targets resolve; each fenced block marked
runnable runs (```` ```bash run ````: here, cheaply) or names the tests that run it (```` ```bash run-by=
tests/test_x.py::test_name,... ````: tests, or fixtures the tests use, that exist and whose source holds each
command); the layers of pipeline/ in docs/contributing.md agree with the imports. Everything is read at run time:
new params, pages and modules are checked without editing this file."""
import ast
import copy
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

from pipeline.common import UserError
from pipeline.config import SECTIONS, load_params
from tests.conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS, ROOT / "BENCHMARKS.md"]  # BENCHMARKS.md: checked, documents no param
SOURCE_DIRS = ("pipeline", "stages", "bench", "tests", "docs", ".ci")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "parquet", "safetensors", "png", "csv", "npy", "pt", "gguf", "txt",
                 "yaml", "yml", "lock", "html", "tsv", "whl", "ini", "cfg", "toml", "sh"}  # `train.jsonl` is a file
FENCE = re.compile(r"^```(.*)$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def leaves(node: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf: a scalar, a list, or an empty mapping (pack.weights: {})."""
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        out += leaves(value, f"{path}.") if isinstance(value, dict) and value else [path]
    return out


def resolves(path: str, tree: dict | None = None) -> bool:
    """A dotted path names a key of params.yaml (or of `tree`): a section, a leaf, or a key under a mapping-valued
    leaf such as pack.weights (`-S +pack.weights.mysource=2.0` adds one)."""
    node = params() if tree is None else tree
    for part in path.split("."):
        if not isinstance(node, dict):
            return False
        if part not in node:
            return node == {}  # under an open mapping (pack.weights: {}), any key may be added
        node = node[part]
    return True


def placeholder(value: str) -> bool:
    """`N`, `<exp>`, `...`, `$X`: a value the reader fills in, not one to check."""
    return bool(re.fullmatch(r"[A-Z][A-Z_]*|.*[<>{}$].*|\.\.\.|", value.strip("'\"")))


def with_overrides(overrides: list[tuple[str, object]]) -> dict:
    merged = copy.deepcopy(params())
    for path, value in overrides:
        *parents, last = path.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return merged


LOADED: dict[str, list[str]] = {}  # params text -> its problems: the docs repeat the same values


def section_problems(merged: dict, tmp_path: Path) -> set[str]:
    """Every section of `merged` loaded as the stages load it: the problems each names, one by one."""
    text = yaml.safe_dump(merged, sort_keys=False)
    if text not in LOADED:
        file = tmp_path / "params.yaml"
        file.write_text(text)
        LOADED[text] = []
        for section, cls in SECTIONS.items():
            try:
                load_params(section, cls, str(file))
            except UserError as e:
                LOADED[text] += str(e).split(": ", 1)[1].split("; ")  # drop the file name, one problem each
    return set(LOADED[text])


def load_problems(merged: dict, tmp_path: Path) -> list[str]:
    """What the docs' values add to the problems of params.yaml as it is (tests/test_params.py checks that it
    loads; a param renamed there but not in pipeline/config.py is reported once, not on every line of the docs)."""
    return sorted(section_problems(merged, tmp_path) - section_problems(params(), tmp_path))


# ---- reading the pages ----------------------------------------------------------------------------------------

def blocks(path: Path) -> list[tuple[str, list[str], int]]:
    """The fenced blocks of a page: (info string, lines, line number of the opening fence)."""
    out, info, lines, start = [], None, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and info is None:
            info, lines, start = fence.group(1).strip(), [], number
        elif line.strip() == "```" and info is not None:
            out.append((info, lines, start))
            info = None
        elif info is not None:
            lines.append(line)
    assert info is None, f"{rel(path)}:{start}: a fenced block is never closed"
    return out


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced blocks."""
    out, inside = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            out.append((number, line))
    return out


def spans(path: Path) -> list[tuple[int, str]]:
    """Inline code spans of the prose, with their line numbers."""
    return [(n, s) for n, line in prose(path) for s in re.findall(r"`([^`]+)`", line)]


def command_lines(path: Path) -> list[tuple[int, str]]:
    """Lines of shell blocks (bash, sh, console, no language) with their line numbers."""
    out = []
    for info, lines, start in blocks(path):
        if info.split(" ")[0] in ("bash", "sh", "shell", "console", ""):
            out += [(start + i + 1, line) for i, line in enumerate(lines)]
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m.group(1).strip() for _, line in prose(path) if (m := re.match(r"#{1,6} (.*)", line))]


@cache
def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    out, seen = set(), {}
    for heading in headings(path):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


# ---- params -----------------------------------------------------------------------------------------------------

SET_PARAM = re.compile(r"(?:^|[\s`(])-S\s+(['\"]?)\+?([A-Za-z_][\w.]*)=([^\s'\"`);]*)\1")
DOTTED = re.compile(r"(?<![\w./$-])([a-z_][a-z0-9_]*(?:\.[A-Za-z_][\w]*)+)(?![\w/(-])")  # `model.f(` is code


def set_params(text: str) -> list[tuple[str, str]]:
    return [(key, value) for _, key, value in SET_PARAM.findall(text)]


def test_every_set_param_names_a_param_and_its_value_loads(tmp_path):
    """`-S key=value` in a command or in prose: the key is in params.yaml (top-level `lr` included) and the values
    of one command, applied together as DVC applies them, load in every section (a sweep `a,b` is tried value by
    value). A line holding several commands (check_fit's advice: `... (else: ...; ...)`) is split at `;` and
    `(else:`."""
    found, wrong = 0, []
    for page in PAGES:
        lines = [(n, part) for n, line in prose(page) + command_lines(page) for part in re.split(r";|\(else:", line)]
        for number, line in lines:
            pairs = set_params(line)
            found += len(pairs)
            for key, _ in pairs:
                if not resolves(key):
                    wrong.append(f"{rel(page)}:{number}: -S {key}: no such param in params.yaml")
            checked = [(k, v) for k, v in pairs if resolves(k) and not placeholder(v)]
            # a,b: one experiment per value (a sweep); [a,b]: one list value
            values = [[v] if v.startswith("[") else v.split(",") for _, v in checked]
            sweep = max(map(len, values), default=0)
            for i in range(sweep):
                overrides = [(k, yaml.safe_load(vs[min(i, len(vs) - 1)])) for (k, _), vs in zip(checked, values)]
                for problem in load_problems(with_overrides(overrides), tmp_path):
                    wrong.append(f"{rel(page)}:{number}: {' '.join(f'-S {k}={v}' for k, v in checked)}: {problem}")
    assert found > 10, "the docs name params with -S: the pattern no longer matches them"
    assert not wrong, "\n".join(wrong)


def dotted_names(page: Path) -> list[tuple[int, str, str | None]]:
    """Every `section.key` the page names, with the value given with it (`section.key: value` in a code span)."""
    sections = set(params())
    out = []
    for number, line in prose(page) + command_lines(page):
        for name in DOTTED.findall(line):
            if name.split(".")[0] in sections and name.rsplit(".", 1)[1] not in FILE_SUFFIXES:
                out.append((number, name, None))
    for number, span in spans(page):
        if match := re.fullmatch(r"([a-z_][\w.]*\.[\w.]+): (.+)", span):
            if match.group(1).split(".")[0] in sections:
                out.append((number, match.group(1), match.group(2)))
    return out


def test_every_section_key_named_in_the_docs_is_a_param_and_its_value_loads(tmp_path):
    wrong, found = [], 0
    for page in PAGES:
        for number, name, value in dotted_names(page):
            found += 1
            if not resolves(name):
                wrong.append(f"{rel(page)}:{number}: {name}: no such param in params.yaml")
            elif value is not None and not placeholder(value):
                for problem in load_problems(with_overrides([(name, yaml.safe_load(value))]), tmp_path):
                    wrong.append(f"{rel(page)}:{number}: `{name}: {value}`: {problem}")
    assert found > 50, "the docs name params as section.key: the pattern no longer matches them"
    assert not wrong, "\n".join(wrong)


def yaml_snippets(page: Path) -> list[tuple[int, dict]]:
    out = []
    for info, lines, start in blocks(page):
        if info.split(" ")[0] in ("yaml", "yml"):
            loaded = yaml.safe_load("\n".join(lines))
            assert isinstance(loaded, dict), f"{rel(page)}:{start}: a YAML snippet that is not a mapping"
            out.append((start, loaded))
    return out


def test_every_yaml_snippet_shows_params_that_exist_with_values_that_load(tmp_path):
    wrong = []
    for page in PAGES:
        for start, snippet in yaml_snippets(page):
            missing = [path for path in leaves(snippet) if not resolves(path)]
            wrong += [f"{rel(page)}:{start}: {path}: no such param in params.yaml" for path in missing]
            if not missing:
                overrides = [(path, value) for path in leaves(snippet)
                             if not placeholder(str(value := _get(snippet, path)))]
                wrong += [f"{rel(page)}:{start}: {p}" for p in load_problems(with_overrides(overrides), tmp_path)]
    assert not wrong, "\n".join(wrong)


def _get(node: dict, path: str):
    for part in path.split("."):
        node = node[part]
    return node


def documented() -> set[str]:
    """What docs/ documents: dotted names anywhere in its pages, and the leaves of its YAML snippets."""
    names = set()
    for page in DOCS:
        text = page.read_text()
        names |= set(DOTTED.findall(text)) | set(re.findall(r"`([a-z_][a-z0-9_]*)`", text))
        names |= {path for _, snippet in yaml_snippets(page) for path in leaves(snippet)}
    return names


def test_every_param_is_documented_in_docs():
    """A key is documented when a page of docs/ names it as `section.key` (the top-level `lr` as `lr`), or shows
    it under its section in a YAML snippet."""
    names = documented()
    missing = [path for path in leaves(params()) if path not in names]
    assert not missing, (f"params.yaml keys named nowhere in docs/ ({len(missing)}): {', '.join(missing)}; describe "
                         "each in the docs page of its topic (its Params table) as `section.key`")


# ---- links, paths, modules, options, make targets ------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_every_relative_link_and_anchor_resolves():
    wrong = []
    for page in PAGES:
        for number, line in prose(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists() or ROOT not in (dest, *dest.parents):
                    wrong.append(f"{rel(page)}:{number}: link to {target}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    wrong.append(f"{rel(page)}:{number}: link to {target}: no heading with that anchor in "
                                 f"{rel(dest)}")
    assert not wrong, "\n".join(wrong)


REPO_PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(re.escape(d) for d in SOURCE_DIRS)})/[\w./-]*\w)"
                       r"(?![\w<*{])(?:(::)(\w+)|:(\w+)\(\))?")  # `tests/test_<module>.py` is a pattern, not a path


def function_in(path: str, name: str) -> ast.FunctionDef | None:
    file = ROOT / path
    if not file.is_file():
        return None
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def test_every_repo_path_and_test_named_exists():
    """`pipeline/x.py`, `bench/y.py`, `tests/test_z.py::test_name`, `pipeline/train.py:train()`, in prose or in
    commands: the file exists (and the function, when one is named)."""
    wrong, found = [], 0
    for page in PAGES:
        for number, line in prose(page) + command_lines(page):
            for path, sep, test, func in REPO_PATH.findall(line):
                found += 1
                if not (ROOT / path).exists():
                    wrong.append(f"{rel(page)}:{number}: {path}: no such file in the repository")
                elif (test or func) and function_in(path, test or func) is None:
                    wrong.append(f"{rel(page)}:{number}: {path} defines no function {test or func}")
    assert found > 30, "the docs name repo paths: the pattern no longer matches them"
    assert not wrong, "\n".join(wrong)


MODULE = re.compile(r"python[\d.]* -m ((?:pipeline|stages|bench)\.\w+)|python[\d.]* ((?:pipeline|stages|bench)/\w+\.py)")


def invocations(page: Path):
    """(line number, our module's file, the rest of the command) for `python -m pipeline.x ...` and
    `python bench/y.py ...`, in commands and code spans."""
    for number, line in command_lines(page) + spans(page):
        command = line.split(" # ")[0].split("|")[-1]
        for match in MODULE.finditer(command):
            module = match.group(1) or match.group(2)
            file = ROOT / (module.replace(".", "/") + ".py" if match.group(1) else module)
            yield number, file, command[match.end():]


def test_every_module_and_option_of_our_tools_exists():
    """`python -m pipeline.view ... --rows 5`: the module exists, and each option it is given is one its source
    declares."""
    wrong, found = [], 0
    for page in PAGES:
        for number, file, rest in invocations(page):
            found += 1
            if not file.is_file():
                wrong.append(f"{rel(page)}:{number}: {rel(file)}: no such module")
                continue
            source = file.read_text()
            for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split("&&")[0]):
                if option != "--help" and f'"{option}"' not in source:
                    wrong.append(f"{rel(page)}:{number}: {rel(file)} has no option {option}")
    assert found > 10, "the docs run our modules: the pattern no longer matches them"
    assert not wrong, "\n".join(wrong)


def defines(file: Path, name: str) -> bool:
    """The module defines `name` at its top level (a function, a class or an assignment)."""
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and name in {
                t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)}:
            return True
    return False


def test_every_module_and_name_in_code_spans_exists():
    """`pipeline.memory.check_fit`, `stages.base`, `bench.gpu_check`: the module exists and defines the name."""
    wrong = []
    for page in PAGES:
        for number, span in spans(page):
            if match := re.fullmatch(r"((?:pipeline|stages|bench)\.\w+)(?:\.(\w+))?(?:\(.*\))?", span):
                file = ROOT / (match.group(1).replace(".", "/") + ".py")
                if not file.is_file():
                    wrong.append(f"{rel(page)}:{number}: {match.group(1)}: no such module")
                elif match.group(2) and not defines(file, match.group(2)):
                    wrong.append(f"{rel(page)}:{number}: {match.group(1)} defines no {match.group(2)}")
    assert not wrong, "\n".join(wrong)


def test_every_make_target_exists():
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    wrong = []
    for page in PAGES:
        for number, line in command_lines(page) + spans(page):
            for target in re.findall(r"(?:^|&&\s*)make ([a-z][\w-]*)", line.strip()):
                if target not in targets:
                    wrong.append(f"{rel(page)}:{number}: make {target}: no such target in the Makefile")
    assert not wrong, "\n".join(wrong)


def test_pointers_from_the_code_to_the_docs_land_on_a_heading():
    """Messages and comments that send the reader to `README: <section>` name a heading of the README or docs/
    (a line break may cut the name: a prefix is enough)."""
    titles = [h for page in PAGES for h in headings(page)]
    wrong = []
    for file in [*sorted((ROOT / "pipeline").glob("*.py")), *sorted((ROOT / "stages").glob("*.py")),
                 ROOT / "params.yaml"]:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            for name in re.findall(r"README(?:\.md)?: ([A-Z][\w ,'-]*\w)", line):
                if not any(title.startswith(name) for title in titles):
                    wrong.append(f"{rel(file)}:{number}: README: {name}: no such heading in README.md or docs/")
    assert not wrong, "\n".join(wrong)


# ---- runnable blocks --------------------------------------------------------------------------------------------

def runnable(kind: str) -> list[tuple[Path, int, str, list[tuple[str, str]]]]:
    """Blocks whose info string is `bash run` (kind "run") or `bash run-by=...` (kind "run-by"): (page, line,
    info, [(command as written, its words without the comment, joined by one space)])."""
    out = []
    for page in PAGES:
        for info, lines, start in blocks(page):
            words = info.split()
            if len(words) > 1 and words[1].split("=")[0] == kind:
                commands = [(line, " ".join(shlex.split(line, comments=True))) for line in lines]
                out.append((page, start, words[1], [(line, plain) for line, plain in commands if plain]))
    return out


def is_fixture(node: ast.FunctionDef) -> bool:
    """@pytest.fixture or @pytest.fixture(...): a shared end-to-end run may live in one."""
    return any("fixture" in ast.unparse(d) for d in node.decorator_list)


def normalized_source(node: ast.FunctionDef) -> str:
    """The string constants of a test (f-string parts included), joined: a command given as one string, as
    f"... {x} ..." or as a list of arguments reads the same."""
    parts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return " " + " ".join(" ".join(p.split()) for p in parts) + " "


def test_blocks_marked_run_by_name_tests_that_exist_and_run_each_command():
    marked = runnable("run-by")
    assert marked, "the README's four commands are marked run-by: the convention no longer matches"
    wrong = []
    for page, start, info, commands in marked:
        sources = []
        for test_id in info.split("=", 1)[1].split(","):
            path, _, name = test_id.partition("::")
            node = function_in(path, name)
            if node is None or not (name.startswith("test_") or is_fixture(node)):
                wrong.append(f"{rel(page)}:{start}: {test_id}: no such test (or fixture the tests use)")
            else:
                sources.append(normalized_source(node))
        for _, command in commands:
            if sources and not any(f" {command} " in s for s in sources):
                wrong.append(f"{rel(page)}:{start}: `{command}` is run by none of {info.split('=', 1)[1]}")
    assert not wrong, "\n".join(wrong)


def test_blocks_marked_run_run():
    marked = runnable("run")
    assert marked, "docs/contributing.md marks its --help block run: the convention no longer matches"
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                        "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    for page, start, _, commands in marked:
        for command, _ in commands:
            proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"{rel(page)}:{start}: `{command}` failed:\n{proc.stderr[-2000:]}"


# ---- the pages themselves ---------------------------------------------------------------------------------------

def test_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/ (at most 200)"
    head = "\n".join(lines[:40])
    assert "make repro" in head and "make test" in head


def test_each_docs_page_opens_with_its_task_and_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert len(DOCS) >= 8
    for page in DOCS:
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# "), f"{rel(page)}: opens with a title"
        assert lines[1].startswith("You want to"), f"{rel(page)}: the first line after the title says the task " \
                                                    "it serves: 'You want to ...'"
        assert f"(docs/{page.name})" in readme, f"{rel(page)}: not in the README's map of the docs"


def test_every_stage_is_in_the_readme_stage_table():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    readme = (ROOT / "README.md").read_text()
    missing = [s for s in stages if f"| `{s}` |" not in readme]
    assert not missing, f"stages missing from the README's stage table: {missing}"


def layers() -> list[list[str]]:
    """The layers block of docs/contributing.md, top layer first."""
    page = ROOT / "docs" / "contributing.md"
    found = [lines for info, lines, _ in blocks(page) if info.split()[1:2] == ["layers"]]
    assert len(found) == 1, "docs/contributing.md has one ```text layers block"
    return [line.split() for line in found[0] if line.strip()]


def test_the_layers_of_pipeline_in_contributing_agree_with_the_imports():
    """Every module of pipeline/ is on one line of the layers block, imports only modules on lower lines, and
    is described in docs/contributing.md."""
    from tests.test_layout import imports_of, module_file

    rows = layers()
    level = {m: len(rows) - i for i, row in enumerate(rows) for m in row}
    modules = sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")
    assert sorted(level) == modules and sum(map(len, rows)) == len(modules), \
        f"each pipeline module on exactly one line of the layers block: missing " \
        f"{sorted(set(modules) - set(level))}, unknown {sorted(set(level) - set(modules))}"
    wrong = []
    for m in modules:
        for dep in imports_of(module_file(f"pipeline.{m}")):
            name = dep.split(".")[1] if dep.startswith("pipeline.") else None
            if name and name != m and name in level and level[name] >= level[m]:
                wrong.append(f"pipeline/{m}.py imports pipeline/{name}.py, which is not on a lower line")
    assert not wrong, "\n".join(wrong) + "\n(move the importer up in docs/contributing.md, or the import down)"
    text = (ROOT / "docs" / "contributing.md").read_text()
    assert not [m for m in modules if f"`pipeline/{m}.py`" not in text], "a module without its line in the table"


# ---- the checks can fail ------------------------------------------------------------------------------------------

def test_the_checks_catch_a_renamed_param_and_a_param_that_does_not_exist(tmp_path):
    """Renaming a key of params.yaml leaves the new name undocumented and the docs' mentions of the old name
    unresolved; a name that was never a param does not resolve; a bad value does not load."""
    renamed = copy.deepcopy(params())
    key = next(k for k, v in renamed["train"].items() if not isinstance(v, dict))
    renamed["train"][f"{key}_renamed"] = renamed["train"].pop(key)
    assert not resolves(f"train.{key}", renamed) and resolves(f"train.{key}_renamed", renamed)
    assert f"train.{key}" in documented() and f"train.{key}_renamed" in set(leaves(renamed)) - documented()
    assert not resolves("train.learning_rate") and not resolves("lr.x") and resolves("pack.weights.any")
    assert set_params("dvc exp run -S 'lr=1e-5,3e-5' -S +pack.weights.a=2.0") == [("lr", "1e-5,3e-5"),
                                                                                   ("pack.weights.a", "2.0")]
    assert load_problems(with_overrides([("train.batch_size", 0)]), tmp_path)
    assert placeholder("N") and placeholder("<exp>") and not placeholder("16")
