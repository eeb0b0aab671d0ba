from cli.bench.profile import parse_collapsed


def test_self_time_goes_to_the_innermost_frame_without_line_numbers() -> None:
    text = "\n".join(
        [
            "<module> (services/persist/__main__.py:3);run (uvloop/__init__.py:82);"
            "execute (/x/site-packages/aiomysql/cursors.py:239) 30",
            "<module> (services/persist/__main__.py:3);write (/work/main/services/persist/writer.py:120) 50",
            "<module> (services/persist/__main__.py:3);execute (/x/site-packages/aiomysql/cursors.py:250) 20",
            "garbage line",
        ]
    )
    total, top = parse_collapsed(text)
    assert total == 100
    assert top == [
        ("execute (aiomysql/cursors.py)", 0.5),
        ("write (services/persist/writer.py)", 0.5),
    ]


def test_empty_profile() -> None:
    assert parse_collapsed("") == (0, [])
