"""`keel monitor --follow --on-bad CMD` on a live verl `file`-logger JSONL ({"step": N, "data": {...}} lines)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from keel.monitor import monitor_main

RULES = "- metric: actor/entropy\n  good: [1.0, null]\n  bad: [null, 0.5]\n  patience: 2\n"
ENTROPY = [2.0, 1.8, 1.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]  # bad from step 4, bad overall at step 5


def verl_line(step, h):
    return json.dumps({"step": step, "data": {"actor/entropy": h, "critic/score/mean": 0.1 * step,
                                              "training/global_step": step}}) + "\n"


def test_on_bad_runs_once_while_verl_is_still_logging(tmp_path):
    log, rules, out = tmp_path / "verl_run.jsonl", tmp_path / "rules.yaml", tmp_path / "hook.txt"
    rules.write_text(RULES)
    log.write_text("")
    entropy = ENTROPY + [0.3] * 20  # a long run: 32 steps, bad from step 5 on
    written = []
    stop = threading.Event()

    def verl():  # verl's FileLogger: one line per step, unbuffered
        with open(log, "a") as f:
            for step, h in enumerate(entropy, 1):
                if stop.is_set():
                    return
                f.write(verl_line(step, h))
                f.flush()
                written.append(step)
                time.sleep(0.3)

    cmd = f'echo "$KEEL_BAD_STEP $KEEL_RULE $KEEL_VERDICT" >> {out}'
    proc = subprocess.Popen([sys.executable, "-m", "keel", "monitor", str(log), "--follow", "--json", "--interval",
                             "0.2", "--rules", str(rules), "--on-bad", cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())  # the monitor is up (and has seen no step yet)
    assert first["steps"] == 0
    writer = threading.Thread(target=verl)
    writer.start()
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        done_when_stopped = len(written)
        stop.set()
        writer.join()
    assert proc.returncode == 3, stderr
    assert out.read_text() == "5 actor/entropy bad\n"  # ran exactly once, with the first bad step
    assert 5 <= done_when_stopped < len(entropy)  # it acted while verl was still logging
    assert "turned bad at step 5" in stderr
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["first_bad_step"] == 5 and last["overall"] == "bad"


def test_on_bad_exit_codes(tmp_path, capsys):
    log, rules = tmp_path / "verl_run.jsonl", tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log.write_text("".join(verl_line(s, h) for s, h in enumerate(ENTROPY[:3], 1)))  # healthy so far
    assert monitor_main([str(log), "--rules", str(rules), "--follow", "--count", "2", "--interval", "0.01",
                         "--json", "--on-bad", "exit 0"]) == 0
    log.write_text("".join(verl_line(s, h) for s, h in enumerate(ENTROPY, 1)))
    assert monitor_main([str(log), "--rules", str(rules), "--json", "--on-bad", "exit 7"]) == 4  # the command failed
    assert "--on-bad command exited 7" in capsys.readouterr().err
    assert monitor_main([str(log), "--rules", str(rules), "--json", "--on-bad", "true"]) == 3
    assert monitor_main([str(log), "--rules", str(rules), "--json"]) == 0  # no --on-bad: unchanged


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
def test_on_bad_command_sees_the_reason(tmp_path):
    log, rules, out = tmp_path / "verl_run.jsonl", tmp_path / "rules.yaml", tmp_path / "reason.txt"
    rules.write_text(RULES)
    log.write_text("".join(verl_line(s, h) for s, h in enumerate(ENTROPY[:6], 1)))
    assert monitor_main([str(log), "--rules", str(rules), "--json", "--on-bad",
                         f'printf "%s|%s" "$KEEL_RUN" "$KEEL_REASON" > {out}']) == 3
    run, reason = out.read_text().split("|")
    assert run == str(log) and reason == "actor/entropy 0.3 < 0.5 for 3 steps"
