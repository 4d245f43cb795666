"""Path templates and sanitization: every rendered path is clean and stays relative."""

from __future__ import annotations

from datetime import date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processing.destinations import (
    InvalidTarget,
    render_path,
    sanitize_component,
    sanitize_path,
    split_target_path,
    validate_template,
)
from processing.destinations.paths import MAX_COMPONENT_BYTES, MAX_PATH_CHARS

DAY = date(2024, 5, 1)


def render(template: str = "{owner}/{date}/{filename}", **values: object) -> str:
    arguments: dict[str, object] = {
        "owner": "alice",
        "filename": "report.pdf",
        "upload_id": "u1",
        "date": DAY,
    }
    arguments.update(values)
    return render_path(template, **arguments)  # type: ignore[arg-type]


def test_renders_the_template() -> None:
    assert render() == "alice/2024-05-01/report.pdf"
    assert render("{year}/{month}/{day}/{upload_id}-{filename}") == "2024/05/01/u1-report.pdf"
    assert render(date=datetime(2024, 12, 31, 23, 59)) == "alice/2024-12-31/report.pdf"


def test_missing_values_have_defaults() -> None:
    assert render(owner=None, filename=None) == "anonymous/2024-05-01/u1"
    assert render(filename="") == "alice/2024-05-01/u1"


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("../../etc/passwd", "alice/2024-05-01/_.._etc_passwd"),
        ("..", "alice/2024-05-01/_"),
        ("/abs.txt", "alice/2024-05-01/_abs.txt"),
        ('a"b*c:d<e>f?g\\h|i.txt', "alice/2024-05-01/a_b_c_d_e_f_g_h_i.txt"),
        ("  spaced name .txt.  ", "alice/2024-05-01/spaced name .txt"),
        ("CON", "alice/2024-05-01/_CON"),
        ("con.txt", "alice/2024-05-01/_con.txt"),
        ("LPT9", "alice/2024-05-01/_LPT9"),
        ("desktop.ini", "alice/2024-05-01/_desktop.ini"),
        ("~$draft.docx", "alice/2024-05-01/_$draft.docx"),
        ("my_vti_file", "alice/2024-05-01/my_vti-file"),
        ("tab\there\x00.txt", "alice/2024-05-01/tab_here_.txt"),
        (".bashrc", "alice/2024-05-01/bashrc"),
        (" ", "alice/2024-05-01/_"),
        ("...", "alice/2024-05-01/_"),
    ],
)
def test_filenames_are_confined_to_one_clean_component(filename: str, expected: str) -> None:
    assert render(filename=filename) == expected


def test_owner_with_separators_does_not_create_directories() -> None:
    assert render(owner="evil/../../root") == "evil_.._.._root/2024-05-01/report.pdf"


def test_long_names_are_cut_keeping_the_extension() -> None:
    name = "é" * 300 + ".pdf"
    rendered = render(filename=name).split("/")[-1]
    assert rendered.endswith(".pdf")
    assert len(rendered.encode()) <= MAX_COMPONENT_BYTES


def test_overlong_paths_are_refused() -> None:
    with pytest.raises(InvalidTarget):
        render("/".join(["{owner}"] * 10) + "/{filename}", owner="o" * 60)
    assert len(render("{owner}/{filename}", owner="o" * 100)) < MAX_PATH_CHARS


@pytest.mark.parametrize(
    "template",
    [
        "",
        "/abs/{filename}",
        "{owner}/{date}",
        "{filename.__class__}",
        "{filename!r}",
        "{filename:>10}",
        "{nope}/{filename}",
        "{filename",
        "{owner}//{filename}",
        "{owner}/{filename}/",
        "{owner}\\{filename}",
    ],
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError):
        validate_template(template)


def test_sanitize_path_refuses_traversal_but_cleans_names() -> None:
    assert sanitize_path("reports/2024/q1:final?.pdf") == "reports/2024/q1_final_.pdf"
    assert sanitize_path("/leading//slashes/x") == "leading/slashes/x"
    for bad in ("../x", "a/../../x", "a\\..\\x", "./x", "", "///"):
        with pytest.raises(InvalidTarget):
            sanitize_path(bad)


def test_split_target_path_accepts_only_clean_paths() -> None:
    assert split_target_path("a/b c/d.txt") == ["a", "b c", "d.txt"]
    for bad in ("/a", "a/", "a//b", "../a", "a/./b", "a\\b", "a/b:c", "a/CON", "a/b.", " a"):
        with pytest.raises(InvalidTarget):
            split_target_path(bad)


@given(st.text(max_size=300))
def test_sanitize_component_is_clean_and_idempotent(value: str) -> None:
    name = sanitize_component(value)
    assert name and name not in (".", "..")
    assert "/" not in name and "\\" not in name
    assert len(name.encode()) <= MAX_COMPONENT_BYTES
    assert sanitize_component(name) == name


@given(owner=st.text(max_size=80), filename=st.text(max_size=300))
def test_any_values_render_a_clean_relative_path(owner: str, filename: str) -> None:
    path = render(owner=owner, filename=filename)
    assert split_target_path(path)
    assert len(path.split("/")) == 3
