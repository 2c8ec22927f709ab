"""`titanax launch`'s parts that need no process: what reaches the screen, signals, ports,
and the progress counts a step reports."""

import io
import signal
import socket

import jax
import numpy as np
import pytest

import titanax as tx
from titanax.distributed.progress import COUNTER
from titanax.launch import runner
from titanax.launch.output import Output as _Output
from titanax.launch.runner import _Signals

GLOO = (
    "[Gloo] Rank {} is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n"
)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def feed(output, rank, *chunks, now=0.0):
    for chunk in chunks:
        output.feed(rank, chunk.encode(), now)


def test_gloo_messages_are_dropped_even_when_written_into_other_text():
    out = io.StringIO()
    output = _Output(out, 2, all_progress=False)
    feed(output, 1, GLOO.format(4), GLOO.format(5))
    # Two threads' messages written into each other (seen on a 2-process MNIST run).
    head, tail = GLOO.format(0).split("0 is", 1)
    feed(output, 0, head + GLOO.format(1) + "0 is" + tail)
    # One written into a half-printed line, and one split across two reads.
    feed(output, 0, "DistributedError:" + GLOO.format(2) + " step failed\n", GLOO.format(3)[:20])
    feed(output, 0, GLOO.format(3)[20:] + "next\n")
    # What no full message explains: pieces of one, on a line of their own.
    feed(output, 1, "[Gloo] Rank \n6 is connected to 7 peer ranks. Expected number of ")
    feed(output, 1, "connected peer ranks is : 7\n42\n")
    for rank in (0, 1):
        output.feed(rank, b"", 0.0)
    assert out.getvalue() == "[0] DistributedError: step failed\n[0] next\n[1] 42\n"


def test_a_message_written_at_once_is_written_at_once():
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)

    output = _Output(Recorder(), 2, all_progress=False)
    feed(output, 1, 'Traceback (most recent call last):\n  File "x.py"\nValueError: no\n')
    assert writes == [
        '[1] Traceback (most recent call last):\n[1]   File "x.py"\n[1] ValueError: no\n'
    ]


def test_progress_bars_show_from_process_0_at_most_every_30_s_and_their_last_state():
    out = io.StringIO()
    output = _Output(out, 2, all_progress=False)
    for i in range(1, 101):  # tqdm: "\r" + the bar, redrawn in place
        now = i * 0.5  # 50 s in all
        feed(output, 0, f"\rtrain: {i}/100", now=now)
        feed(output, 1, f"\rtrain: {i}/100", now=now)
        if i == 30:
            feed(output, 0, "\n", "a line of its own\n", now=now)  # the bar ends; a print
            feed(output, 0, "\reval: 1/2", "\reval: 2/2\n", now=now)  # another bar
    feed(output, 0, "\n", now=50.0)
    feed(output, 1, "\n", "done\n", now=50.0)
    assert out.getvalue().splitlines() == [
        "[0] train: 1/100",  # at once
        "[0] train: 30/100",  # the last state of the first bar
        "[0] a line of its own",
        "[0] eval: 1/2",
        "[0] eval: 2/2",
        "[0] train: 31/100",  # the next bar, at once
        "[0] train: 91/100",  # 30 s later
        "[0] train: 100/100",  # the last state
        "[1] done",  # process 1's bars are not shown
    ]
    every = io.StringIO()
    output = _Output(every, 2, all_progress=True)
    feed(output, 1, "\rtrain: 1/2", "\rtrain: 2/2\n")
    assert every.getvalue() == "[1] train: 1/2\n[1] train: 2/2\n"


def test_a_bar_left_unfinished_shows_its_last_state_when_the_process_ends():
    out = io.StringIO()
    output = _Output(out, 1, all_progress=False)
    feed(output, 0, "\rtrain: 1/9", "\rtrain: 2/9", "\rtrain: 3/9\r", now=1.0)
    output.feed(0, b"", 2.0)
    assert out.getvalue() == "[0] train: 1/9\n[0] train: 3/9\n"


def test_on_a_terminal_the_bar_is_redrawn_in_place_below_the_lines():
    out = Terminal()
    output = _Output(out, 2, all_progress=False)
    feed(output, 0, "\rtrain: 1/3")
    feed(output, 1, "hello\n")
    feed(output, 0, "\rtrain: 2/3", "\rtrain: 3/3\n")
    output.launch("done")
    erase = "\r\x1b[K"
    assert out.getvalue() == (
        "[0] train: 1/3"
        + f"{erase}[1] hello\n[0] train: 1/3"  # a line above, the bar redrawn below it
        + f"{erase}[0] train: 2/3"
        + f"{erase}[0] train: 3/3\n"  # the bar's last state stays
        + "[launch] done\n"
    )


def test_windows_line_ends_and_split_characters():
    out = io.StringIO()
    output = _Output(out, 1, all_progress=False)
    data = "a\r\nb é\n".encode()
    for i in range(len(data)):  # one byte at a time
        output.feed(0, data[i : i + 1], 0.0)
    assert out.getvalue() == "[0] a\n[0] b é\n"


def test_the_launcher_records_every_signal_that_would_end_it():
    with _Signals() as signals:
        for name in runner._ENDING:
            sig = getattr(signal, name)
            assert signal.getsignal(sig) == signals._record, name
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGTERM)
    assert signals.received == [signal.SIGHUP, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_free_port_gives_two_free_ports():
    port = runner.free_port()
    for p in (port, port + 1):
        with socket.create_server(("127.0.0.1", p)):
            pass


def test_a_step_reports_calls_begun_and_ended():
    step = tx.data_parallel(lambda w, x: w + tx.pmean(x.sum(), "data"), mesh=tx.mesh(data=-1))
    begun, ended = COUNTER.begun, COUNTER.ended
    w = step(np.float32(0), np.ones((8, 2), np.float32))
    w = step(w, np.ones((8, 2), np.float32))
    with pytest.raises(tx.PlanError):
        step(w, y=np.ones((8, 2), np.float32))  # does not fit the signature
    jax.jit(lambda v: step(v, np.ones((8, 2), np.float32)))(w)
    assert (COUNTER.begun - begun, COUNTER.ended - ended) == (4, 4)
