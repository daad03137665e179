"""Invariants of `ipfacediff.cli` that no other test pinned down (mutation review of the entry point: each test fails on
at least one code change that the notebook's checks and the rest of tests/ let through). What they pin: the overview
(`ipfacediff --help`) gives every command's one-line help; a command whose module's package is missing is not offered;
a failed import that is not memory keeps its traceback; positionals and flags without help show no default; unknown
arguments on both sides of the command are the top level's error; `--no-progress` silences the libraries like
`--quiet`, and the hub, loaded already, is told too; a command run from a thread other than the main one still runs;
SIGTERM gets past a command's `except Exception`; our warnings are told from a sibling folder's, from the repository's
and from a relative path; the out-of-memory line: 1 GiB exactly in GiB, CUDA's TiB, numpy's "213. PiB", only the first
line of a message, the type when there is no message, a fallback hint for a command without one. Fake commands written
to tmp_path, offline, one core, each test a few seconds at most."""
import contextlib, importlib.util, io, os, subprocess, sys, threading, warnings

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest

from ipfacediff.cli import main, oom_words

PKG = os.path.dirname(os.path.abspath(importlib.util.find_spec('ipfacediff').origin))   # not cli's own idea of it


def quiet_main(argv, **kw):
    "`cli.main(argv)` with stdout and stderr captured: (exit code, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = main([str(a) for a in argv], **kw)
    return rc, o.getvalue(), e.getvalue()


def usage_error(argv, **kw):
    "`cli.main(argv)` that argparse stops: (exit code, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e), pytest.raises(SystemExit) as x: main(argv, **kw)
    return x.value.code, o.getvalue(), e.getvalue()


COMMAND_SRC = """
import os, warnings
def boom(a):
    if a.what == 'bare': raise MemoryError()
    if a.what == 'lines': raise RuntimeError("can't allocate memory: mmap failed\\nException raised from alloc at c10/core.cpp:42")
    raise MemoryError('no room')
def warn(a): warnings.warn_explicit('careful', UserWarning, a.file, 7)
def term(a):
    import signal, time
    try: os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)
    except Exception: print('swallowed')      # a command's own broad `except Exception` (a fallback, a retry)
def add_cli(sub, name):
    p = sub.add_parser(name)
    if name == 'demo':
        p.add_argument('--prompt', required=True)
        p.add_argument('video', nargs='?', default='in.mp4', help='the video to edit')
        p.add_argument('--fast', action='store_true')
        p.set_defaults(func=lambda a: None)
    elif name == 'q':
        p.add_argument('--no-progress', action='store_true', help='no bars'); p.set_defaults(func=lambda a: print('ran'))
    elif name == 'warn': p.add_argument('file'); p.set_defaults(func=warn)
    elif name == 'term': p.set_defaults(func=term)
    else: p.add_argument('what'); p.set_defaults(func=boom)
"""
NAMES = ('demo', 'q', 'edit', 'cache', 'warn', 'term')


def write_command_modules(folder):
    "One module per command (the CLI asks the command's module for its parser only): `ipfd_mut_<name>`."
    (folder / 'ipfd_mut_cmd.py').write_text(COMMAND_SRC)
    for n in NAMES: (folder / f'ipfd_mut_{n}.py').write_text(f'import ipfd_mut_cmd\ndef add_cli(sub): ipfd_mut_cmd.add_cli(sub, {n!r})\n')
    return {n: (f'ipfd_mut_{n}', n) for n in NAMES}


@pytest.fixture
def cmds(tmp_path, monkeypatch):
    "A command set for `cli.main(commands=...)` backed by modules in tmp_path."
    c = write_command_modules(tmp_path)
    (tmp_path / 'ipfd_mut_broken.py').write_text("raise ImportError(\"No module named 'dlib'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {**c, 'broken': ('ipfd_mut_broken', 'cannot import'), 'ghost': ('ipfd_no_such_pkg.cmd', 'package not installed')}
    for m in [m for m in sys.modules if m.startswith('ipfd_mut_')]: sys.modules.pop(m, None)


# ---------------------------------------------------------------- parsers, help, usage errors

def test_overview_gives_every_commands_help():
    """Kills the overview's stubs added without `help=`: `ipfacediff --help` names each command *and* says what it does."""
    from ipfacediff.cli import COMMANDS
    code, out, err = usage_error(['--help'])
    text = ' '.join(out.split())
    assert code == 0
    for name, (_, help) in COMMANDS.items(): assert help in text, (name, text)


def test_command_whose_package_is_missing_is_not_offered(cmds):
    """Kills `_available` answering True when the module's *package* is missing (find_spec raises ModuleNotFoundError):
    the command is not offered (argparse's invalid choice, exit 2), not an ImportError traceback."""
    code, out, err = usage_error(['ghost'], commands=cmds)
    assert code == 2 and "invalid choice: 'ghost'" in err


def test_import_error_that_is_not_memory_keeps_its_traceback(cmds):
    """Kills the loading stage calling every ImportError/RuntimeError 'out of memory': a command module that cannot be
    imported for another reason (a missing library) is a bug or an install problem, raised as it is."""
    with pytest.raises(ImportError, match='dlib'): quiet_main(['broken'], commands=cmds)


def test_no_default_shown_for_a_positional_or_a_bare_flag(cmds):
    """Kills the help formatter showing a positional's default, and `_CommandParser` giving a flag without help a
    '(default: False)': the first is not an option, the second would read as the opposite of `--fast`."""
    code, out, err = usage_error(['demo', '--help'], commands=cmds)
    assert code == 0 and 'the video to edit' in out and '--fast' in out
    assert 'default' not in out, out


def test_unknown_arguments_on_both_sides_of_the_command_are_the_top_levels(cmds):
    """Kills the 'after the command' check made `any` instead of `all`: with one unknown option before the command and
    one after, the error is the top level's (not the command's) and names both."""
    code, out, err = usage_error(['--bogus', 'demo', '--prompt', 'x', '--extra'], commands=cmds)
    assert code == 2 and err == 'ipfacediff: error: unrecognized arguments: --bogus --extra (see ipfacediff --help)\n', err


# ---------------------------------------------------------------- progress bars, threads, warnings

_SUB = '''
import os, sys
sys.path.insert(0, sys.argv[1])
{pre}
from ipfacediff.cli import main
rc = main(['q', '--no-progress'], commands={{'q': ('ipfd_mut_q', 'q')}})
print(rc, os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'), {post})
'''

def _sub(tmp_path, pre='', post='None'):
    write_command_modules(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != 'HF_HUB_DISABLE_PROGRESS_BARS'}
    r = subprocess.run([sys.executable, '-c', _SUB.format(pre=pre, post=post), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[-3:]


def test_no_progress_is_quiet_too(tmp_path):
    """Kills `main` silencing the libraries for `--quiet` only: finetune's `--no-progress` promises the same."""
    assert _sub(tmp_path) == ['0', '1', 'None']


def test_hub_imported_already_is_silenced(tmp_path):
    """Kills `quiet_libraries` skipping a hub imported already: it read the environment when it loaded (lazily: asking it
    loads it), so it must be told."""
    assert _sub(tmp_path, pre='import huggingface_hub.utils as h; assert not h.are_progress_bars_disabled()',   # loaded, on
                post='h.are_progress_bars_disabled()') == ['0', '1', 'True']


def test_command_runs_outside_the_main_thread(cmds):
    """Kills the SIGTERM handler installed from any thread: `signal.signal` works in the main thread only, so `main`
    called from a worker thread (a notebook's, a server's) must run the command without it."""
    res = []
    def run():
        try: res.append(quiet_main(['q'], commands=cmds))
        except BaseException as e: res.append(e)
    t = threading.Thread(target=run); t.start(); t.join(30)
    assert res and res[0] == (0, 'ran\n', ''), res


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason='signals reach the main thread only')
def test_sigterm_is_not_swallowed_by_except_exception(cmds):
    """Kills `Terminated` made an `Exception`: like Ctrl-C it must get past a command's `except Exception`, so SIGTERM
    still stops the command (143), not just the step it was in."""
    rc, out, err = quiet_main(['term'], commands=cmds)
    assert (rc, out, err) == (143, '', 'ipfacediff: terminated\n')


@pytest.mark.parametrize('where, ours', [('sibling', False), ('parent', False), ('relative', True)])
def test_our_warnings_told_from_others(cmds, monkeypatch, where, ours):
    """Kills `_show_warning` matching the package folder without the separator (a sibling `ipfacediff_old/` is not ours),
    taking the folder above the package for it (the repository's other files are not ours), and comparing a relative file
    name as it is (`ipfacediff/finetune.py` seen from the folder above is ours)."""
    monkeypatch.chdir(os.path.dirname(PKG))
    f = {'sibling': PKG + '_old' + os.sep + 'lib.py', 'parent': os.path.join(os.path.dirname(PKG), 'setup_extra.py'),
         'relative': os.path.join(os.path.basename(PKG), 'finetune.py')}[where]
    with warnings.catch_warnings():
        warnings.simplefilter('always')
        rc, out, err = quiet_main(['warn', f], commands=cmds)
    assert rc == 0
    if ours: assert err == 'ipfacediff: warning: careful\n', err
    else: assert err.startswith(f'{f}:7: UserWarning: careful'), err


# ---------------------------------------------------------------- out of memory, in one line

def test_one_gib_exactly_is_in_gib():
    """Kills the GiB threshold made strict (`>` for `>=`): 2**30 bytes is '1.0 GiB', not '1024.0 MiB'."""
    e = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {2**30} bytes. Error code 12")
    assert oom_words(e) == 'could not allocate 1.0 GiB'
    assert oom_words(RuntimeError(f"can't allocate memory: you tried to allocate {2**30 - 2**20} bytes.")) == 'could not allocate 1023.0 MiB'


def test_cuda_tib_request():
    """Kills CUDA's pattern without TiB: a request of terabytes is still the short 'on the GPU' line."""
    import torch
    e = torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1.50 TiB. GPU 0 has a total capacity of 79.1 GiB')
    assert oom_words(e) == 'could not allocate 1.50 TiB on the GPU'


def test_numpy_pib_has_no_stray_dot():
    """Kills numpy's "117. MiB" repair without PiB: numpy writes 213 PiB as '213. PiB'."""
    try: np.empty((3 * 10**8, 10**8)); pytest.skip('allocated 213 PiB?')
    except MemoryError as e:
        assert str(e).startswith('Unable to allocate 213. PiB'), e          # what numpy says
        assert oom_words(e).startswith('could not allocate 213 PiB for an array'), oom_words(e)


def test_out_of_memory_line_is_one_line_and_never_empty(cmds):
    """Kills `oom_words` keeping every line of the message (a C++ 'Exception raised from' trailer), and giving '' for a
    bare `MemoryError()` (the type is named instead); and `main` without the fallback hint for a command that has none."""
    rc, out, err = quiet_main(['edit', 'lines'], commands=cmds)
    assert rc == 1 and err.startswith("ipfacediff: error: out of memory (can't allocate memory: mmap failed): give a smaller")
    assert err.count('\n') == 1, err
    rc, out, err = quiet_main(['edit', 'bare'], commands=cmds)
    assert rc == 1 and err.startswith('ipfacediff: error: out of memory (MemoryError): give a smaller'), err
    rc, out, err = quiet_main(['cache', 'x'], commands=cmds)
    assert (rc, err) == (1, 'ipfacediff: error: out of memory (no room): work on less at a time\n')
