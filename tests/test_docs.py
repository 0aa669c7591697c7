"""docs/policies.md against the code: a section, a plot and a field table per
kind, JSON examples that are valid policies, defaults that are torch's, and
plots drawn from the examples the page shows. And the repository on its own:
no file refers to documents outside it, every relative link in the Markdown
resolves, and the files docs/architecture.md names exist."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT
from pydantic_core import PydanticUndefined

from lrpilot.policies import KINDS, SpecError, parse_policy

DOCS = ROOT / "docs"
PAGE = (DOCS / "policies.md").read_text()
PER_GROUP_FIELDS = ("min_lr", "base_lr", "max_lr", "base_momentum", "max_momentum")
# The torch scheduler each kind mirrors, and the fields named differently there.
MIRRORS = {
    "plateau": "ReduceLROnPlateau",
    "cyclic": "CyclicLR",
    "cosine_restarts": "CosineAnnealingWarmRestarts",
    "cosine": "CosineAnnealingLR",
    "step": "StepLR",
    "multistep": "MultiStepLR",
    "exponential": "ExponentialLR",
    "linear": "LinearLR",
    "onecycle": "OneCycleLR",
    "sequential": "SequentialLR",
}
# lrpilot's own kinds: no torch scheduler, so no torch defaults to match.
LRPILOT_KINDS = {"guard", "range_test"}  # range_test: its defaults are Lightning's
TORCH_NAMES = {("sequential", "policies"): "schedulers"}
# No torch counterpart: torch takes the value in step(), from one process.
LRPILOT_ONLY = {("plateau", "metric"), ("plateau", "reduce")}


def section(kind: str) -> str:
    """The text of ``## kind`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(kind)}\n(.*?)(?=^## |\Z)", PAGE, re.M | re.S)
    assert match, f"docs/policies.md has no '## {kind}' section"
    return match.group(1)


def json_blocks(text: str) -> list[tuple[int, Any]]:
    """(offset, parsed value) of every ```json block in ``text``."""
    blocks = []
    for match in re.finditer(r"^```json\n(.*?)^```$", text, re.M | re.S):
        try:
            blocks.append((match.start(), json.loads(match.group(1))))
        except json.JSONDecodeError as exc:
            pytest.fail(f"invalid JSON in docs/policies.md at offset {match.start()}: {exc}")
    return blocks


def field_table(kind: str) -> dict[str, tuple[str, str]]:
    """``{field: (default cell, per-group cell)}`` from the kind's field table."""
    rows = {}
    for line in section(kind).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            name = cells[0].strip("`")
            assert name not in rows, f"{kind}: field {name} listed twice"
            rows[name] = (cells[1], cells[2])
    assert rows, f"{kind}: no field table"
    return rows


def documented_default(cell: str) -> Any:
    if cell == "required":
        return PydanticUndefined
    assert cell.startswith("`") and cell.endswith("`"), f"default cell {cell!r} is not `JSON`"
    return json.loads(cell.strip("`"))


def group_count(policy: dict[str, Any]) -> int:
    """How many param groups the policy's per-group lists ask for (1 if none)."""
    lengths = {len(policy[f]) for f in PER_GROUP_FIELDS if isinstance(policy.get(f), list)}
    for stage in policy.get("policies", []):
        stage_groups = group_count(stage)
        if stage_groups > 1:
            lengths.add(stage_groups)
    assert len(lengths) <= 1, f"per-group lists of different lengths in {policy}"
    return lengths.pop() if lengths else 1


def spec_class(kind: str) -> type:
    return type(parse_policy(first_example(kind)))


def first_example(kind: str) -> dict[str, Any]:
    blocks = [value for _, value in json_blocks(section(kind))]
    assert blocks, f"{kind}: no ```json example in its section"
    assert blocks[0].get("kind") == kind, f"{kind}: its first JSON example is {blocks[0]}"
    return blocks[0]


def load_plot_script():
    path = DOCS / "make_policy_plots.py"
    spec = importlib.util.spec_from_file_location("make_policy_plots", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def policy_examples() -> list[Any]:
    return [value for _, value in json_blocks(PAGE) if isinstance(value, dict) and "kind" in value]


# (a) a section and a plot for every kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_section_with_its_plot(kind):
    text = section(kind)
    image = f"img/policy-{kind}.png"
    assert re.search(rf"!\[[^\]]+\]\({re.escape(image)}\)", text), f"{kind}: no ![...]({image})"
    data = (DOCS / image).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, f"{image}: not a plot"


def test_every_image_the_page_references_exists():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", PAGE)
    assert len(images) >= len(KINDS)
    for image in images:
        assert (DOCS / image).is_file(), f"docs/policies.md shows {image}, which does not exist"


# (b) every JSON policy on the page is valid and builds


def test_the_page_has_a_policy_example_per_kind():
    kinds = {example["kind"] for example in policy_examples()}
    assert kinds >= set(KINDS), f"no JSON example for {sorted(set(KINDS) - kinds)}"


@pytest.mark.parametrize("example", policy_examples(), ids=lambda e: e["kind"])
def test_json_examples_parse_and_build(example):
    groups = group_count(example)
    policy = parse_policy(example).build([0.1] * groups)
    assert len(policy.lrs) == groups
    lrs = policy.step({"loss": 1.0, "val_loss": 1.0})
    assert len(lrs) == groups and all(lr >= 0 for lr in lrs)


@pytest.mark.parametrize("example", policy_examples(), ids=lambda e: e["kind"])
def test_json_examples_run_through_lrpilot_simulate(example, lrpilot_exe):
    records = "".join(
        json.dumps({"step": t, "metrics": {"val_loss": 1.0, "loss": 1.0}}) + "\n"
        for t in range(1, 4)
    )
    command = [lrpilot_exe, "simulate", "--policy", json.dumps(example)]
    command += ["--base-lr", "0.1"] * group_count(example)
    done = subprocess.run(command, input=records, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]


def test_a_wrong_group_count_is_refused():
    """group_count() matters: a per-group list built with the wrong count fails."""
    example = {"kind": "plateau", "min_lr": [0.01, 0.001]}
    assert group_count(example) == 2
    with pytest.raises(SpecError, match="min_lr"):
        parse_policy(example).build([0.1])


# (c) the plots are drawn from the examples shown just above them


def test_each_plot_shows_the_json_example_above_it():
    script = load_plot_script()
    names = [example.name for example in script.EXAMPLES]
    assert set(KINDS) <= set(names), f"no plot for {sorted(set(KINDS) - set(names))}"
    blocks = json_blocks(PAGE)
    for example in script.EXAMPLES:
        at = PAGE.find(f"](img/policy-{example.name}.png)")
        assert at >= 0, f"docs/policies.md does not show policy-{example.name}.png"
        above = [value for offset, value in blocks if offset < at]
        assert above and above[-1] == example.policy, (
            f"policy-{example.name}.png is drawn from {example.policy}, "
            f"but the JSON above it is {above[-1] if above else None}"
        )
        assert (DOCS / "img" / f"policy-{example.name}.png").is_file()


# field tables: the spec's fields, defaults and per-group support, and torch's defaults


@pytest.mark.parametrize("kind", KINDS)
def test_field_table_lists_the_specs_fields_and_defaults(kind):
    fields = spec_class(kind).model_fields
    table = field_table(kind)
    assert set(table) == set(fields) - {"kind"}
    for name, (default_cell, _) in table.items():
        documented = documented_default(default_cell)
        actual = fields[name].default
        wrong = f"{kind}.{name}: documented {default_cell}, spec has {actual!r}"
        assert documented == actual, wrong
        # true == 1 in Python: a number documented for a bool (or back) is wrong too.
        numbers = (int, float)
        assert type(documented) is type(actual) or (
            type(documented) in numbers and type(actual) in numbers
        ), wrong


@pytest.mark.parametrize("kind", KINDS)
def test_per_group_column_is_what_the_spec_accepts(kind):
    example = first_example(kind)
    defaults = spec_class(kind).model_fields
    for name, (_, per_group_cell) in field_table(kind).items():
        assert per_group_cell in ("yes", "no"), f"{kind}.{name}: per group is {per_group_cell!r}"
        value = example[name] if name in example else defaults[name].default
        try:
            parse_policy({**example, name: [value, value]}).build([0.1, 0.1])
            accepted = True
        except SpecError:
            accepted = False
        assert accepted == (per_group_cell == "yes"), (
            f"{kind}.{name}: documented per group {per_group_cell!r}, "
            f"but a list of two {'is' if accepted else 'is not'} accepted"
        )


def test_every_kind_mirrors_a_torch_scheduler_or_is_lrpilots_own():
    assert set(MIRRORS) | LRPILOT_KINDS == set(KINDS)
    assert not set(MIRRORS) & LRPILOT_KINDS


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind not in LRPILOT_KINDS])
def test_documented_defaults_are_torchs(kind):
    import torch.optim.lr_scheduler as lr_scheduler

    signature = inspect.signature(getattr(lr_scheduler, MIRRORS[kind]))
    for name, (default_cell, _) in field_table(kind).items():
        torch_name = TORCH_NAMES.get((kind, name), name)
        if (kind, name) in LRPILOT_ONLY:
            assert torch_name not in signature.parameters
            continue
        assert torch_name in signature.parameters, f"{kind}.{name}: torch has no {torch_name}"
        torch_default = signature.parameters[torch_name].default
        documented = documented_default(default_cell)
        if torch_default is inspect.Parameter.empty:
            assert documented is PydanticUndefined, f"{kind}.{name}: required in torch"
        else:
            assert documented == torch_default, f"{kind}.{name}: torch's default {torch_default!r}"


# the repository stands on its own: no reference outside it, every link resolves

# Design notes the project started from, which are not in the repository (the
# pattern is split so that this file does not match it).
OUTSIDE = re.compile(rb"(?:DESIGN|SIMULATE|STYLE)\.md|(?:\.\./|/work/)share[d]/")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6} +(.+?)(?: +#+)? *$", re.M)
# A path into the repository as docs/architecture.md names one.
REPO_PATH = re.compile(
    r"\b((?:client|daemon|dashboards|tests|bench|deploy|docs|scripts)/[\w./-]*\w)"
)


def repo_files() -> list[str]:
    """Tracked files, and new ones git does not ignore (a file not yet added
    counts too)."""
    assert (ROOT / ".git").exists(), (
        "these checks list the repository's files with git: run them in a git checkout"
    )
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def markdown_files() -> list[str]:
    return sorted(name for name in repo_files() if name.endswith(".md"))


def prose(text: str) -> str:
    """Markdown without its code blocks and code spans."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation but - and _
    dropped, spaces as -, a repeated one numbered."""
    seen: dict[str, int] = {}
    found = set()
    for title in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_no_file_refers_to_documents_outside_the_repository():
    found = []
    for name in repo_files():
        for number, line in enumerate((ROOT / name).read_bytes().splitlines(), start=1):
            match = OUTSIDE.search(line)
            if match:
                found.append(f"{name}:{number}: {match.group().decode()}")
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_every_relative_link_in_the_markdown_resolves():
    pages = markdown_files()
    assert "README.md" in pages and "docs/architecture.md" in pages
    broken = []
    for name in pages:
        page = ROOT / name
        text = page.read_text()
        for target in LINK.findall(prose(text)):
            if re.match(r"[a-zA-Z][\w+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_relative_to(ROOT) or not linked.exists():
                broken.append(f"{name}: {target} (no such file in the repository)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                broken.append(f"{name}: {target} (no heading #{anchor} there)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_the_architecture_page():
    readme = (ROOT / "README.md").read_text()
    assert "docs/architecture.md" in LINK.findall(prose(readme))


def test_the_modules_the_architecture_page_names_exist():
    named = set(REPO_PATH.findall((DOCS / "architecture.md").read_text()))
    assert len(named) > 20, f"only {sorted(named)} found; did the page's format change?"
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
