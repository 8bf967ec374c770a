"""Every command-line program: ``--help``, and wrong invocations each answered by one clear line.

One name per program, in its usage line and its error lines alike
(:data:`preprocessing.console.PROGRAMS`: the console script where the project
installs one); every mistake is one line on stderr, ``PROG: error: WHAT``,
naming the input and the reason, with exit status 2 (1 where a server could
not be reached), and no traceback. The calls run in this process (``main(argv)``)
and are cheap; the last tests run the serving programs as real processes that
load TensorFlow and check that its C++ start-up lines stay hidden.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

from preprocessing.console import PROGRAMS

MAINS = {"preprocessing": "preprocessing.cli", "preprocessing.sample_data": "preprocessing.sample_data",
         "trainer": "trainer.cli", "serving.server": "serving.server", "serving.client": "serving.client",
         "serving.loadtest": "serving.loadtest", "serving.release": "serving.release", "scripts.demo": "scripts.demo"}

IN_MEMORY = "--direct_running_mode=in_memory"  # no Beam worker processes for a job refused at once

# (program, argv, exit status, words the one error line must hold); {tmp} is the test's own folder
MISTAKES = [
    ("preprocessing", [], 2, ["required", "--input", "--output"]),
    ("preprocessing", ["--input", "{tmp}/photos", "--output", "{tmp}/data", "--image-szie", "32"], 2,
     ["--image-szie", "did you mean --image-size?"]),
    ("preprocessing", ["--input", "{tmp}/photos", "--output", "{tmp}/data", "--image-size", "96x"], 2,
     ["--image-size", "'96x'"]),
    ("preprocessing", ["--input", "{tmp}/photos", "--output", "{tmp}/data", "--resize-mode", "squash"], 2,
     ["--resize-mode", "'squash'"]),
    ("preprocessing", ["--input", "{tmp}/nope", "--output", "{tmp}/data", IN_MEMORY], 2,
     ["{tmp}/nope", "not found"]),
    ("preprocessing.sample_data", [], 2, ["required", "root"]),
    ("preprocessing.sample_data", ["{tmp}/s", "--per-class", "0"], 2, ["--per-class", "'0' must be at least 1"]),
    ("preprocessing.sample_data", ["{tmp}/s", "--per-class", "many"], 2, ["--per-class", "'many'"]),
    ("preprocessing.sample_data", ["{tmp}/a-file"], 2, ["{tmp}/a-file", "not a folder"]),
    ("preprocessing.sample_data", ["{tmp}"], 2, ["{tmp}", "not empty"]),
    ("trainer", [], 2, ["required", "--data", "--job-dir"]),
    ("trainer", ["--data", "{tmp}", "--job-dir", "{tmp}/job", "--backbone", "mobilenet"], 2,
     ["--backbone", "'mobilenet'", "mobilenet_v2"]),
    ("trainer", ["--data", "{tmp}", "--job-dir", "{tmp}/job", "--epochs", "0"], 2, ["--epochs", "'0'", "at least 1"]),
    ("trainer", ["--data", "{tmp}", "--job-dir", "{tmp}/job", "--max-search-time", "soon"], 2,
     ["--max-search-time", "'soon'"]),
    ("trainer", ["--data", "{tmp}/nope", "--job-dir", "{tmp}/job"], 2, ["--data {tmp}/nope", "no such folder"]),
    ("serving.server", [], 2, ["--model-base-path"]),
    ("serving.server", ["--model-base-path", "{tmp}/nope"], 2, ["{tmp}/nope", "not a folder"]),
    ("serving.server", ["--model-base-path", "{tmp}", "--port", "http"], 2, ["--port", "'http'"]),
    ("serving.server", ["--model-base-path", "{tmp}", "--version-label", "stable"], 2,
     ["--version-label", "LABEL=VERSION", "'stable'"]),
    ("serving.server", ["--model-base-path", "{tmp}", "--ssl-cert", "{tmp}/a-file"], 2, ["--ssl-cert", "--ssl-key"]),
    ("serving.client", [], 2, ["IMAGES_OR_FOLDERS", "predict, metadata, status"]),
    ("serving.client", ["predict"], 2, ["predict", "required", "IMAGES_OR_FOLDERS"]),
    ("serving.client", ["--top-k", "three", "{tmp}"], 2, ["--top-k", "'three'"]),
    ("serving.client", ["--model-version", "1", "--label", "stable", "{tmp}"], 2,
     ["--label", "not allowed with", "--model-version"]),
    ("serving.client", ["--server", "127.0.0.1:1", "{tmp}/missing.jpg"], 2, ["{tmp}/missing.jpg"]),
    ("serving.loadtest", [], 2, ["required", "IMAGES_OR_FOLDERS"]),
    ("serving.loadtest", ["--concurrency", "0", "{tmp}"], 2, ["--concurrency", "at least 1", "0"]),
    ("serving.loadtest", ["--batch", "two", "{tmp}"], 2, ["--batch", "'two'"]),
    ("serving.loadtest", ["--duration", "-1", "{tmp}"], 2, ["--duration", "positive"]),
    ("serving.loadtest", ["{tmp}/missing.jpg"], 2, ["{tmp}/missing.jpg"]),
    ("serving.release", [], 2, ["status, promote or rollback"]),
    ("serving.release", ["promote", "--label", "canary"], 2, ["promote", "required", "VERSION", "--model-config-file"]),
    ("serving.release", ["promote", "three", "--label", "canary", "--model-config-file", "{tmp}/m"], 2,
     ["promote", "VERSION", "'three'"]),
    ("serving.release", ["status", "--model-config-file", "{tmp}/nope.config"], 2, ["{tmp}/nope.config", "not found"]),
    ("serving.release", ["promote", "2", "--label", "prod", "--model-config-file", "{tmp}/nope.config"], 2,
     ["unknown label 'prod'", "canary, stable"]),
    ("scripts.demo", ["--backbone", "resnet"], 2, ["--backbone", "'resnet'"]),
    ("scripts.demo", ["--tuner", "grid-search"], 2, ["--tuner", "'grid-search'"]),
    ("scripts.demo", ["--input", "{tmp}/nope"], 2, ["--input {tmp}/nope", "no such"]),
    ("scripts.demo", ["--weights", "{tmp}/nope.weights.h5"], 2, ["--weights {tmp}/nope.weights.h5", "no such file"]),
    ("scripts.demo", ["--per-class", "2"], 2, ["--per-class", "'2' must be at least 6"]),
    ("scripts.demo", ["--image-size", "big"], 2, ["--image-size", "'big'"]),
]


def _answer(program: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the program's ``main(argv)`` here: (exit status, stdout, stderr)."""
    main = importlib.import_module(MAINS[program]).main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("program", sorted(MAINS))
def test_help_names_the_program_as_its_errors_do(program, capsys):
    code, out, err = _answer(program, ["--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"usage: {PROGRAMS[program]} ")
    if not PROGRAMS[program].startswith("python -m"):
        assert f"python -m {program}" in " ".join(out.split())  # the equivalent without the console script


@pytest.mark.parametrize("program, argv, status, words", MISTAKES,
                         ids=[f"{p}:{' '.join(a)[:40] or 'no-arguments'}" for p, a, _, _ in MISTAKES])
def test_a_mistake_is_one_line_naming_the_input_and_the_reason(program, argv, status, words, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    tmp = str(tmp_path)
    code, out, err = _answer(program, [a.replace("{tmp}", tmp) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{PROGRAMS[program]}: error: "), lines[0]
    for word in words:
        assert word.replace("{tmp}", tmp) in lines[0], lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "job").exists()


@pytest.mark.parametrize("program", sorted(MAINS))
def test_every_program_has_five_mistakes_covered_and_verbose(program, capsys):
    assert sum(p == program for p, *_ in MISTAKES) >= 5
    if program in ("serving.client", "serving.release"):  # a subcommand's flag
        argv = ["status", "--help"]
    else:
        argv = ["--help"]
    code, out, _ = _answer(program, argv, capsys)
    assert code == 0 and "--verbose, -v" in out


# -- the serving programs as real processes: TensorFlow loads, and its C++ start-up lines stay hidden ------------

# what TensorFlow's C++ side prints as it loads (absl's prefix, oneDNN, CUDA probing), as seen before they were hidden
CPP_LINE_MARKS = ("absl::InitializeLog", "oneDNN", "cuda", "cuInit", "I0000 ", "E0000 ", "W0000 ")


@pytest.fixture(scope="module")
def serving_processes(repo_root, tmp_path_factory):
    """Each serving program run once, all at the same time: {program: (exit status, stderr)}."""
    tmp = tmp_path_factory.mktemp("serving_cli")
    (tmp / "image.jpg").write_bytes(b"not really a jpeg")
    (tmp / "export").mkdir()
    (tmp / "models.config").write_text(
        'model_config_list { config { name: "classifier" base_path: "%s" model_platform: "tensorflow" } }\n'
        % (tmp / "export"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    commands = {
        "serving.client": ["status", "--server", "127.0.0.1:1", "--retries", "0", "--timeout", "2"],
        "serving.loadtest": ["--server", "127.0.0.1:1", "--requests", "1", "--timeout", "2", str(tmp / "image.jpg")],
        "serving.release": ["status", "--model-config-file", str(tmp / "models.config")],
        "serving.server": ["--model-config-file", str(tmp / "models.config"), "--port", "0", "--rest-port", "-1",
                           "--file-system-poll-wait-seconds", "0"],
    }
    started = {program: subprocess.Popen([sys.executable, "-m", program, *argv], cwd=repo_root, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for program, argv in commands.items()}
    server = started["serving.server"]
    results = {program: (process.wait(timeout=180), process.stderr.read())
               for program, process in started.items() if process is not server}
    # the server runs until told to stop: wait for its "listening" line (stderr is read line by line meanwhile)
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "listening on" in line or "serving model" in line:
            break
    server.send_signal(signal.SIGTERM)
    results["serving.server"] = (server.wait(timeout=60), "".join(seen) + server.stderr.read())
    return results


@pytest.mark.parametrize("program", ["serving.client", "serving.loadtest", "serving.release", "serving.server"])
def test_serving_programs_print_no_tensorflow_start_up_lines(program, serving_processes):
    status, err = serving_processes[program]
    noise = [line for line in err.splitlines() if any(mark in line for mark in CPP_LINE_MARKS)]
    assert noise == [], err
    if program in ("serving.client", "serving.loadtest"):  # no server at that address: one line, status 1
        [line] = err.strip().splitlines()
        assert status == 1 and line.startswith(f"{PROGRAMS[program]}: error: 127.0.0.1:1: UNAVAILABLE"), err
    elif program == "serving.release":
        assert status == 0 and err == ""
    else:
        assert status == 0 and "listening on" in err and "stopped" in err, err
