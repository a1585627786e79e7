"""The README's op table is what the backend records say (python -m onestep_kernels.optable)."""

from onestep_kernels import optable


def test_readme_op_table_matches_the_records():
    section = optable.readme_section(optable.README.read_text())
    assert section == optable.table(), (
        "README.md's op table differs from the backend records: run "
        "`python -m onestep_kernels.optable --write`")


def test_table_lists_every_backend_of_every_op():
    from onestep_kernels.dispatch import OPS

    text = optable.table()
    for op in OPS.values():
        for name in op.backends:
            assert f"| `{op.name}` | `{name}` |" in text
