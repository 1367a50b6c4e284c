"""bench/migrate runs end to end (small): the real command, invited owners verifying, the
sweep, and a check of every device in the database and in the simulator."""


def test_quick_migration_bench_reports_zero_failures(capsys):
    from bench import migration as bench_migration

    status = bench_migration.main(
        ["--devices", "20", "--new-owners", "5", "--limit", "100/5", "--rate", "50"]
    )
    output = capsys.readouterr().out
    assert status == 0, output
    assert "devices                         20" in output
    assert "failures                        0" in output
    assert "claimed: 15, invited: 5" in output
