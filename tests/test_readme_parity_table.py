"""README's "How correctness is shown" table is exactly the tolerances the suite asserts."""

from pathlib import Path

from tests.support.parity import PARITY, readme_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_shows_the_tolerances_the_tests_assert():
    text = README.read_text(encoding="utf-8")
    section = text.split("## How correctness is shown", 1)[1].split("\n## ", 1)[0]
    assert readme_table() in section, "README table is stale: paste `python -m tests.support.parity` into it"


def test_every_check_is_used_by_a_test():
    sources = "\n".join(path.read_text(encoding="utf-8") for path in README.parent.glob("tests/**/test_*.py"))
    unused = [key for key in PARITY if f'"{key}"' not in sources]
    assert unused == []
