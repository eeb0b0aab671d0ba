from __future__ import annotations

from libs.db.migrate import _split_statements, load_migrations
from libs.shards import spread_shards


def test_migrations_are_numbered_and_parse() -> None:
    for kind in ("global", "shard"):
        migrations = load_migrations(kind)
        assert migrations, kind
        assert [m.version for m in migrations] == sorted(m.version for m in migrations)
        for m in migrations:
            assert m.statements, m.name
            assert all(";" not in s for s in m.statements)


def test_split_ignores_comment_lines() -> None:
    sql = "-- a; comment\nCREATE TABLE a (x INT);\n\n-- other\nINSERT INTO a VALUES (1);\n"
    assert _split_statements(sql) == ("CREATE TABLE a (x INT)", "INSERT INTO a VALUES (1)")


def test_spread_shards_round_robin() -> None:
    assert spread_shards(range(1, 6), [1, 2]) == {1: 1, 2: 2, 3: 1, 4: 2, 5: 1}
    assert spread_shards([3], [7]) == {3: 7}
