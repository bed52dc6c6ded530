"""The ``kvcore`` command on hostile input: one line on stderr and exit status 2, before
the run, never a traceback or a hang (each run has a timeout, so a hang fails)."""

import json
import os
import subprocess
import sys
import time
from dataclasses import fields

import pytest

import kvcore
from kvcore import cli
from kvcore.simulate import ConfigurationError, SimConfig, Simulator

TINY = ["--requests", "8", "--pages", "512", "--max-running", "16", "--device", "cpu",
        "--quiet"]
TIMEOUT = 60


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvcore", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)


def assert_rejected(proc, *needles, command="simulate"):
    """Exit 2, nothing on stdout (the run never started), one line on stderr."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"kvcore {command}: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr.strip()


# -- configs that used to hang -------------------------------------------------------------

def test_max_running_below_the_sample_count_is_rejected():
    line = assert_rejected(run_cli("simulate", "--max-running", "2", "--requests", "16"),
                           "--max-running 2 is below the 4 samples", "--multi-sample-share 0")
    assert "raise --max-running to at least 4" in line


def test_max_running_one_is_fine_without_multi_sample_requests():
    proc = run_cli("simulate", *TINY, "--max-running", "1", "--multi-sample-share", "0")
    assert proc.returncode == 0, proc.stderr


def test_a_very_low_arrival_rate_skips_the_idle_stretches():
    start = time.perf_counter()
    proc = run_cli("simulate", *TINY, "--arrival-rate", "1e-9")
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < TIMEOUT
    steps = next(line for line in proc.stdout.splitlines() if line.startswith("steps "))
    assert "idle, skipped)" in steps


def test_an_arrival_rate_too_low_to_count_in_steps_is_rejected():
    assert_rejected(run_cli("simulate", *TINY, "--arrival-rate", "1e-300"),
                    "--arrival-rate 1e-300 requests per step is too low")


def test_a_request_that_cannot_finish_even_alone_is_rejected_up_front():
    # each sample fits the pool, four of them at full length do not
    flags = ["--pages", "160", "--multi-sample-share", "1", "--max-prompt-len", "512",
             "--system-prompt-len", "0", "--system-prompt-share", "0", "--prompt-median",
             "500", "--output-median", "1000", "--max-output-len", "1024"]
    assert_rejected(run_cli("simulate", *TINY, *flags), "even when running alone",
                    "raise --pages")


def test_the_runtime_guard_stops_a_livelock(monkeypatch):
    """Were the up-front check missing, preempting the only running request would
    recompute it forever; the simulator raises instead."""
    monkeypatch.setattr(Simulator, "_check_workload", lambda self: None)
    # lengths clip at 40: 10 shared prompt pages + 10 per sample > 29 pages, for 2-4 samples
    cfg = SimConfig(requests=1, pages=29, page_size=4, max_prompt_len=40, max_output_len=40,
                    prompt_median=10**4, output_median=10**4, system_prompt_len=0,
                    system_prompt_share=0.0, multi_sample_share=1.0, max_running=4,
                    max_step_tokens=64, device="cpu")
    with pytest.raises(ConfigurationError, match="even when running alone"):
        Simulator(cfg).run()


# -- pools that cannot be allocated --------------------------------------------------------

def test_a_pool_too_large_for_memory_is_rejected_before_allocating():
    assert_rejected(run_cli("simulate", *TINY, "--layers", "100000"),
                    "of host memory", "KV pool", "lower --pages")


def test_too_many_requests_for_memory_are_rejected():
    assert_rejected(run_cli("simulate", "--requests", str(10**13)), "lower --requests")


def test_an_allocation_failure_is_a_clean_error(monkeypatch, capsys):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("kvcore.simulate.KVCache", no_memory)
    with pytest.raises(ConfigurationError, match="could not allocate the KV pool"):
        Simulator(SimConfig(requests=4, device="cpu"))
    assert cli.main(["simulate", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err


# -- outputs, checked before the run -------------------------------------------------------

def test_an_unsupported_plot_format_is_rejected_before_the_run():
    assert_rejected(run_cli("simulate", *TINY, "--plot", "out.txt"),
                    "--plot out.txt: unsupported format '.txt'", ".png")
    assert_rejected(run_cli("simulate", *TINY, "--plot", "out"), "no file extension")
    assert_rejected(run_cli("simulate", *TINY, "--plot", "-"), "needs a file name")


def test_plot_without_matplotlib_is_rejected_before_the_run(tmp_path):
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(fake.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    assert_rejected(run_cli("simulate", *TINY, "--plot", str(tmp_path / "p.png"), env=env),
                    "--plot needs matplotlib", "pip install 'kvcore[plot]'")


def test_an_unwritable_json_path_is_rejected_before_the_run(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_rejected(run_cli("simulate", *TINY, "--json", str(a_file / "out.json")),
                    "is not a directory")
    assert_rejected(run_cli("simulate", *TINY, "--json", str(tmp_path)), "is a directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write to read-only folders")
def test_a_read_only_folder_is_rejected_before_the_run(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_rejected(run_cli("simulate", *TINY, "--json", str(folder / "a" / "o.json")),
                        "cannot write there")
    finally:
        folder.chmod(0o700)


def test_bench_out_dir_must_be_writable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_rejected(run_cli("bench", "--out-dir", str(a_file)), "is not a directory",
                    command="bench")


# -- bad values, named with what is expected ----------------------------------------------

@pytest.mark.parametrize(("flags", "line"), [
    (["--requests", "x"], "--requests must be a positive integer, got 'x'"),
    (["--requests", "0"], "--requests must be a positive integer, got '0'"),
    (["--requests", "1.5"], "--requests must be a positive integer, got '1.5'"),
    (["--verify-every", "-1"], "--verify-every must be an integer >= 0, got '-1'"),
    (["--arrival-rate", "fast"], "--arrival-rate must be a positive number, got 'fast'"),
    (["--arrival-rate", "nan"], "--arrival-rate must be a positive number, got 'nan'"),
    (["--arrival-rate", "inf"], "--arrival-rate must be a positive number, got 'inf'"),
    (["--system-prompt-share", "2"],
     "--system-prompt-share must be a number from 0 to 1, got '2'"),
    (["--dtype", "int8"],
     "--dtype must be one of float16, bfloat16, float32, float8_e4m3fn, got 'int8'"),
    (["--layout", "nhd"], "--layout must be one of NHD, HND, got 'nhd'"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--prompt-median", str(10**30)], "--prompt-median must be at most 2**63 - 1"),
    (["--window", "0"], "--window must be a positive integer, got '0'"),
    (["--window", str(2**31)], "--window must be at most 2**31 - 1 tokens"),
    (["--window-layers", "1"],
     "--window-layers must be a number between 0 and 1 (exclusive), got '1'"),
    (["--window-layers", "half"],
     "--window-layers must be a number between 0 and 1 (exclusive), got 'half'"),
    (["--speculative", "-1"], "--speculative must be an integer >= 0, got '-1'"),
    (["--speculative", "2.5"], "--speculative must be an integer >= 0, got '2.5'"),
    (["--requests"], "--requests: expected one argument"),
    (["--device-typo", "cpu"], "unrecognized arguments: --device-typo cpu"),
])
def test_bad_values_name_the_option_and_what_is_expected(flags, line):
    got = assert_rejected(run_cli("simulate", *flags))
    assert got.startswith(f"kvcore simulate: error: {line}"), got


@pytest.mark.parametrize(("flags", "needle"), [
    (["--pages", "100"], "needs 208 pages of 16 tokens, but the pool has 100"),
    (["--pages", str(2**31)], "--pages 2,147,483,648 is too many"),
    (["--max-step-tokens", "1000"], "--max-step-tokens 1000 is below the longest prompt"),
    (["--system-prompts", "0"], "--system-prompt-share 0.4 needs at least one system prompt"),
    (["--window-layers", "0.25"], "--window-layers needs --window W"),
    (["--window", "64", "--layers", "1"],
     "--window-layers 0.5 of --layers 1 makes 1 sliding-window and 0 full-attention layers"),
    (["--window", "64", "--window-layers", "0.2"], "makes 0 sliding-window and 2 full"),
    (["--window", "64", "--pages", "250"],
     "needs 208 pages of 16 tokens in the full-attention group, 288 with the sliding-window"),
])
def test_impossible_combinations_are_rejected(flags, needle):
    assert_rejected(run_cli("simulate", *flags), needle)


def test_no_command_is_one_line():
    proc = run_cli()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("kvcore: error: ")


# -- help, version, JSON on stdout, a normal run -------------------------------------------

def test_every_simulate_option_has_help_with_units():
    assert set(cli.SIMULATE_HELP) == {f.name for f in fields(SimConfig)}
    proc = run_cli("simulate", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for f in fields(SimConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "arrivals per step" in text                      # --arrival-rate's unit
    assert "most sequences decoding at once" in text        # what --max-running counts
    assert "0 = no spot checks" in text                     # --verify-every 0
    assert "'-' writes it to stdout" in text and "human summary then goes to stderr" in text


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"kvcore {kvcore.__version__}\n"


def test_json_to_stdout_moves_the_table_to_stderr():
    proc = run_cli("simulate", *TINY, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and data["requests_done"] == 8
    assert "integrity: " in proc.stderr and "tokens written" in proc.stderr


def test_a_normal_tiny_run_exits_0(tmp_path):
    out = tmp_path / "new" / "sim.json"
    proc = run_cli("simulate", *TINY, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    data = json.loads(out.read_text())
    finished = data["sequences_verified"] - data["spot_checks"]
    assert last == (
        f"integrity: {data['sequences_verified']:,} sequence read-backs ({finished:,} "
        f"finished samples + {data['spot_checks']:,} spot checks of live ones), "
        f"{data['tokens_verified']:,} tokens compared (per read-back: shared prompts and "
        f"spot-checked tokens count again), 0 mismatches, 0 invariant failures")
    assert finished == data["samples_done"]
    # without --window / --speculative there is nothing of theirs
    assert not {"hybrid", "speculative", "utilization"} & set(data)
    assert not {"window", "window_layers", "speculative"} & set(data["config"])
    assert "speculative" not in proc.stdout and "window" not in proc.stdout


def test_window_and_speculative_run_clean_and_report(tmp_path):
    out = tmp_path / "sim.json"
    proc = run_cli("simulate", *TINY, "--window", "64", "--speculative", "3", "--json",
                   str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(", 0 mismatches, 0 invariant failures")
    rows = {line[:38].strip(): line[39:] for line in lines[:-1]}
    assert rows["layer groups"] == "full attention: layers 1; window 64: layers 0"
    for name in ("window group pages peak / full group", "KV memory, hybrid / all full",
                 "window pages per sequence max / bound", "KV utilization, paged / contiguous",
                 "speculative decoding"):
        assert name in rows, proc.stdout
    assert rows["window pages per sequence max / bound"].endswith("; 0 over")
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["config"]["window"] == 64 and data["config"]["speculative"] == 3
    hybrid = data["hybrid"]
    assert hybrid["window_bound_violations"] == 0
    assert hybrid["max_window_pages_per_seq_decode"] <= hybrid["window_page_bound_decode"] == 6
    assert data["speculative"]["drafts_rejected"] > 0
    assert 0 < data["utilization"]["paged"] <= 1
    assert len(data["timeline"]["window_pages"]) == len(data["timeline"]["step"])
