"""Several processes on one gallery library at once: writers, readers, and a lock held too long.

Each other process is a real one (a subprocess), synchronised through its output: it says
when it holds what it holds, and lets go when its stdin closes, so no test sleeps to wait.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shitu.cli.main import main as shitu_main
from shitu.errors import GalleryError
from shitu.fileio import file_sha256
from shitu.index import Gallery, GalleryItem, metadata
from shitu.index import gallery as gallery_module
from shitu.index.locking import ReadWriteLock
from shitu.index.manifest import ModelMismatchError
from tests.index_helpers import PixelEmbedder, clustered, make_images, other_process_holding

DIM = 16
WIDE = 512  # features as a real model's


def index_files(library: Path) -> list[str]:
    return sorted(p.name for p in library.glob("index-*.faiss"))


def new_library(path: Path, count: int = 20) -> np.ndarray:
    """A Flat library of `count` vectors labelled 'base'; returns the vectors."""
    data = clustered(count, DIM)
    with Gallery.create(path, embedding_dim=DIM, model_fingerprint="test-model") as gallery:
        gallery.add(data, ["base"] * count)
    return data


def test_ctrl_c_stops_a_write_however_long_it_would_wait_for_another(tmp_path):
    """SQLite waits for a lock in C, where Python handles no signal: a Ctrl-C on a write
    waiting for another process's was held until the wait ran out (a minute)."""
    path = tmp_path / "lib"
    new_library(path)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from shitu.index import Gallery, metadata
        metadata.LOCK_WAIT_S, metadata.WAIT_NOTICE_S = 3600.0, 0.0  # says at once it waits
        with Gallery.open({str(path)!r}) as gallery:
            try:
                gallery.add(np.ones((1, {DIM}), np.float32), ["interrupted"])
            except KeyboardInterrupt:
                print("interrupted")
        """
    )
    with other_process_holding(path, "BEGIN IMMEDIATE"):
        writer = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        wait_until_waiting(writer)
        writer.send_signal(signal.SIGINT)
        said, _ = writer.communicate(timeout=30)  # ends while the other still writes
    assert writer.returncode == 0 and said == "interrupted\n"
    with Gallery.open(path) as gallery:
        assert gallery.verify() == [] and len(gallery) == 20


def test_a_write_that_cannot_commit_past_a_long_reader_is_rolled_back(tmp_path, monkeypatch):
    """A reader in another process (`index verify` of a big library) holds its read lock
    longer than a writer waits to commit: the write fails with a GalleryError saying so,
    and the library takes the next write as usual. The failed COMMIT used to leave the
    connection inside its transaction: a raw sqlite3 error, and every later write of that
    Gallery (a server's) joined that transaction, was reported done and never committed."""
    path = tmp_path / "lib"
    new_library(path)
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.2)
    with Gallery.open(path) as gallery:
        refused = pytest.raises(GalleryError, match="reading the library .* nothing was changed")
        with other_process_holding(path, "BEGIN"), refused:
            gallery.add(np.ones((1, DIM), np.float32), ["refused"])
        assert len(gallery) == 20 and gallery.verify() == []
        gallery.add(np.ones((1, DIM), np.float32), ["later"])
    with Gallery.open(path) as reopened:
        assert reopened.label_counts() == {"base": 20, "later": 1}
        assert reopened.verify() == []


def test_a_write_lock_held_too_long_is_an_error_naming_the_other_writer(
    tmp_path, monkeypatch, caplog
):
    """The writer says it is waiting (a command that waits silently for a minute looks
    hung), then, where the other write goes on, fails with what was waited for."""
    path = tmp_path / "lib"
    new_library(path)
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(metadata, "WAIT_NOTICE_S", 0.1)
    refused = pytest.raises(GalleryError, match="another process has been writing to it")
    with Gallery.open(path) as gallery, other_process_holding(path, "BEGIN IMMEDIATE"), refused:
        gallery.remove(ids=[1])
    assert "another process is writing to the library; waiting up to 0.3 s" in caplog.text
    with Gallery.open(path) as reopened:
        assert len(reopened) == 20 and reopened.verify() == []


def run_in_other_process(library: Path, code: str, **popen: Any) -> str:
    """Run `code` with `gallery` open on `library` in another process, to its end; its output."""
    script = "import numpy as np\nfrom shitu.index import Gallery\n"
    script += f"gallery = Gallery.open({str(library)!r})\n{textwrap.dedent(code)}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, **popen
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_index_file_written_for_a_write_that_did_not_commit_goes_with_it(tmp_path, monkeypatch):
    """A write that wrote a new index file (a large add) and then could not commit (a
    reader held on past the wait; also Ctrl-C while it waits, a full disk) removes that
    file: it stayed until the next write that changed vectors, on a full disk maybe as
    large as the library's index and in the way of the very write that would remove it."""
    path = tmp_path / "lib"
    new_library(path)
    committed = index_files(path)
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.2)
    with Gallery.open(path) as gallery:
        refused = pytest.raises(GalleryError, match="cannot commit")
        with other_process_holding(path, "BEGIN"), refused:
            gallery.add(clustered(10, DIM, seed=4), ["large"] * 10)
        assert index_files(path) == committed
        gallery.add(clustered(10, DIM, seed=4), ["large"] * 10)  # and the retry goes through
    with Gallery.open(path) as reopened:
        assert reopened.verify() == [] and len(reopened) == 30
    assert len(index_files(path)) == 1


def test_verify_checks_the_library_as_other_processes_left_it(tmp_path):
    """A library another process wrote to since it was opened is healthy: verify (`shitu
    index verify` while a server edits) reported its own stale copy as problems."""
    path = tmp_path / "lib"
    new_library(path)
    with Gallery.open(path) as gallery:
        run_in_other_process(
            path, "gallery.add(np.ones((3, 16), np.float32), ['new'] * 3)\ngallery.remove(ids=[2])"
        )
        assert gallery.verify() == []
        assert len(gallery) == 22 and gallery.label_counts() == {"base": 19, "new": 3}


def test_a_servers_searches_go_on_while_its_edit_waits_for_another_writer(tmp_path, monkeypatch):
    """`shitu serve` edits a library that another process is writing (an `index rebuild` of
    a big library: minutes): the edit waits for the other write, searches do not. They
    waited for the edit (so up to LOCK_WAIT_S, every recognition request), and once the
    check for other processes' writes was due, for that check queued behind the edit."""
    from shitu.serving import library as library_module
    from shitu.serving.library import SharedLibrary

    path = tmp_path / "lib"
    data = new_library(path)
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 30.0)  # what a stalled search would wait
    monkeypatch.setattr(library_module, "SYNC_INTERVAL_S", 0.0)  # the check always due
    shared = SharedLibrary()
    try:
        shared.attach(shared.run(lambda: Gallery.open(path)))
        with ThreadPoolExecutor(1) as pool, other_process_holding(path, "BEGIN IMMEDIATE"):
            removal = pool.submit(shared.write, lambda gallery: gallery.remove(ids=[1]))
            while not removal.running():  # the write is on its way to the library's thread
                pass
            assert shared.search(data[:1], k=1).ids[0, 0] == 1  # before the edit
            assert not removal.done()  # answered while the edit waits for the other writer
        assert removal.result().tolist() == [1]
        assert shared.search(data[:1], k=1).ids[0, 0] != 1
    finally:
        shared.close()


def test_a_write_committed_by_another_process_just_after_ours_is_loaded_later(
    tmp_path, monkeypatch
):
    """Another process commits between this write's commit and its update of the loaded
    library (the writers above hit it by chance). The library took that process's generation
    as its own without loading its rows: they were never searchable here, and a large write
    then checkpointed an index file without them that opening did not mend."""
    path = tmp_path / "lib"
    data = new_library(path)
    other = np.full((1, DIM), 3.0, np.float32)

    def another_process_commits(point: str) -> None:
        if point == "after-commit":
            run_in_other_process(
                path, f"gallery.add(np.full((1, {DIM}), 3.0, np.float32), ['other'])"
            )

    with Gallery.open(path) as gallery:
        monkeypatch.setattr(gallery_module, "crash_point", another_process_commits)
        gallery.add(data[:1] + 1.0, ["ours"])
        monkeypatch.undo()
        assert gallery.stale() and gallery.refresh()
        assert gallery.search(other, k=1).labels[0, 0] == "other"
        gallery.add(clustered(10, DIM, seed=5), ["large"] * 10)  # writes the index file
    with Gallery.open(path) as reopened:
        assert reopened.verify() == [] and len(reopened) == 32
        assert reopened.search(other, k=1).labels[0, 0] == "other"


def test_a_rebuild_decides_its_settings_from_another_processs_rebuild_since(tmp_path):
    """Rebuild kept the settings of the manifest as this object had loaded it: after
    another process rebuilt an HNSW32 library as IVF with its nprobe, an `ef_search`
    rebuild here wrote IVF with that ef_search, which IVF never reads, and lost the nprobe;
    a rebuild to HNSW32 said it dropped the ef_search it had, not the nprobe it dropped."""
    path = tmp_path / "lib"
    options = {"ef_search": 64}
    with Gallery.create(
        path, embedding_dim=DIM, model_fingerprint="m", index_type="HNSW32", backend_options=options
    ) as gallery:
        gallery.add(clustered(20, DIM), ["base"] * 20)
    with Gallery.open(path) as gallery:
        run_in_other_process(path, "gallery.rebuild('IVF', nprobe=10)")
        with pytest.raises(GalleryError, match=r"ef_search: only with index_type HNSW32 \(not IVF"):
            gallery.rebuild(ef_search=128)
        assert (gallery.manifest.index_type, gallery.manifest.backend_options) == (
            "IVF",
            {"nprobe": 10},
        )
        run_in_other_process(path, "gallery.rebuild(nprobe=12)")
        assert gallery.rebuild("HNSW32", ef_search=128) == {"nprobe": 12}
    with Gallery.open(path) as reopened:
        assert reopened.verify() == []
        assert reopened.manifest.index_type == "HNSW32"
        assert reopened.manifest.backend_options == {"ef_search": 128}


def test_a_rebuild_refuses_a_type_or_setting_it_cannot_build_without_the_write_lock(
    tmp_path, monkeypatch
):
    """`rebuild("Flat", nprobe=10)` or `rebuild("HSNW32")` waited for the library's write
    lock (up to LOCK_WAIT_S behind another process's write, then refused as busy) before
    refusing the setting or type, which it can tell from what it was given alone."""
    path = tmp_path / "lib"
    new_library(path)
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.2)  # without the fix: refused as busy
    refusals = [
        (("Flat",), {"nprobe": 10}, r"^index option nprobe: only with index_type IVF"),
        (("HSNW32",), {}, r"^unknown index type 'HSNW32': choose one of \('Flat', "),
    ]
    for args, options, refusal in refusals:
        refused = pytest.raises(GalleryError, match=refusal)
        held = other_process_holding(path, "BEGIN IMMEDIATE")
        with Gallery.open(path) as gallery, held, refused:
            gallery.rebuild(*args, **options)
    with Gallery.open(path) as reopened:
        assert reopened.manifest.index_type == "Flat" and reopened.verify() == []


def test_an_add_after_another_process_re_embedded_the_library_is_refused(tmp_path):
    """A library opened without a model, then re-embedded by another process with a model
    of the same size: an add of the old model's features took them in beside the new
    model's, silent garbage in every search (of another size, Faiss failed on a bare
    AssertionError). The refusal advised another model or --precision, or a re-embedding,
    where the re-embedding was what happened: it says so, and to open the library again."""
    photos = make_images(tmp_path / "photos", 4)
    old, new = PixelEmbedder(fingerprint="old"), PixelEmbedder(fingerprint="new")
    path = tmp_path / "lib"
    Gallery.build(path, old, [GalleryItem(photo, "base") for photo in photos[:2]])

    def refusal(model: str, size: int, opened_with: str) -> str:
        return re.escape(
            f"{path}: re-embedded with model {model} ({size}-d features) by another process "
            f"since this one opened it (of model {opened_with}); nothing was changed: open it "
            f"again, with model {model}"
        )

    with Gallery.open(path) as gallery, Gallery.open(path, embedder=old) as for_old:
        with Gallery.open(path) as other_writer:
            other_writer.reembed(new)
        with pytest.raises(ModelMismatchError, match=f"^{refusal('new', 48, 'old')}$"):
            gallery.add_files(old, [GalleryItem(photos[2], "late")])
        with pytest.raises(ModelMismatchError, match=f"^{refusal('new', 48, 'old')}$"):
            for_old.add_files(old, [GalleryItem(photos[2], "late")])  # `shitu index add`'s way
        wider = PixelEmbedder(side=8, fingerprint="wider")
        with Gallery.open(path) as other_writer:
            other_writer.reembed(wider)
        with pytest.raises(ModelMismatchError, match=f"^{refusal('wider', 192, 'new')}$"):
            gallery.add(np.ones((1, new.embedding_size), np.float32), ["late"])
    with Gallery.open(path, embedder=wider) as reopened:
        assert reopened.verify() == [] and reopened.label_counts() == {"base": 2}


def test_a_create_that_another_process_beats_to_its_path_says_so(tmp_path, monkeypatch):
    """Two processes making one library at once: the one whose rename came second failed
    on an OSError naming its staging folder (`Directory not empty: .lib.creating-...`),
    where a build said the library was made meanwhile."""
    path = tmp_path / "lib"
    write_manifest = metadata.MetadataStore.write_manifest

    def another_process_creates_it_first(store, manifest):
        monkeypatch.setattr(metadata.MetadataStore, "write_manifest", write_manifest)
        script = f"from shitu.index import Gallery\nGallery.create({str(path)!r}, embedding_dim=4, "
        script += "model_fingerprint='other').close()"
        subprocess.run([sys.executable, "-c", script], check=True)
        write_manifest(store, manifest)

    monkeypatch.setattr(metadata.MetadataStore, "write_manifest", another_process_creates_it_first)
    with pytest.raises(
        GalleryError, match=rf"^{path}: already exists \(built meanwhile by another"
    ):
        Gallery.create(path, embedding_dim=DIM, model_fingerprint="test-model")
    with Gallery.open(path) as gallery:  # the other's, whole; no staging folder left beside it
        assert gallery.manifest.model_fingerprint == "other" and gallery.verify() == []
    assert [p.name for p in tmp_path.iterdir()] == ["lib"]


def test_other_processes_read_while_a_large_write_is_under_way(tmp_path, monkeypatch):
    """A write larger than SQLite's page cache (here 3,000 rows of 512-d features, 6 MB)
    spilled its pages into the file, which takes the exclusive lock: from then to its
    commit (its index built: minutes for a large add or a re-embedding) every other
    process's read waited, and failed after LOCK_WAIT_S (a server's searches stalled)."""
    path = tmp_path / "lib"
    with Gallery.create(path, embedding_dim=WIDE, model_fingerprint="test-model") as gallery:
        gallery.add(np.random.default_rng(0).normal(size=(20, WIDE)), ["base"] * 20)
    reader = textwrap.dedent(
        f"""
        from shitu.index import Catalog, metadata
        metadata.LOCK_WAIT_S = 1.0  # a reader kept waiting fails soon
        with Catalog({str(path)!r}) as catalog:
            print(catalog.stats()["images"])
        """
    )
    seen: list[str] = []

    def another_process_reads(point: str) -> None:
        if point == "rows-written":  # inside the write, its rows inserted
            done = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True)
            seen.append(done.stdout.strip() or done.stderr.strip().splitlines()[-1])

    monkeypatch.setattr(gallery_module, "crash_point", another_process_reads)
    with Gallery.open(path) as gallery:
        gallery.add(np.random.default_rng(1).normal(size=(3000, WIDE)), ["large"] * 3000)
    assert seen == ["20"]  # the library before the write, read while it ran


WRITER = """
rng = np.random.default_rng(int(sys.argv[1]))
for step in range(20):
    vector = rng.standard_normal((1, 16)).astype(np.float32)
    (added,) = gallery.add(vector, [f"writer {sys.argv[1]}"]).ids
    assert gallery.search(vector, k=1).ids[0, 0] == added  # its own write, searchable
    if step % 5 == 4:  # and one removed again
        (passing,) = gallery.add(rng.standard_normal((1, 16)).astype(np.float32), ["gone"]).ids
        gallery.remove(ids=[passing])
gallery.refresh()
assert gallery.verify() == [], gallery.verify()
"""


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
def test_writers_in_three_processes_lose_no_update(tmp_path, index_type):
    """Three processes each add and remove in small writes, interleaved as they come: every
    write of every one is in the library, each saw its own writes in its index, and the
    index file is the one the manifest names."""
    path = tmp_path / "lib"
    data = clustered(20, DIM)
    with Gallery.create(
        path, embedding_dim=DIM, model_fingerprint="test-model", index_type=index_type
    ) as gallery:
        gallery.add(data, ["base"] * 20)
    script = "import sys\nimport numpy as np\nfrom shitu.index import Gallery\n"
    script += f"gallery = Gallery.open({str(path)!r})\n{WRITER}"
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(seed)], stderr=subprocess.PIPE)
        for seed in range(3)
    ]
    for writer in writers:
        assert writer.wait(60) == 0, writer.stderr.read().decode()
    with Gallery.open(path) as gallery:
        assert gallery.verify() == []
        expected = {"base": 20, "writer 0": 20, "writer 1": 20, "writer 2": 20}
        assert gallery.label_counts() == expected and len(gallery) == 80
    assert sorted(p.name for p in path.iterdir()) == ["gallery.sqlite", *index_files(path)]
    assert len(index_files(path)) == 1


def test_a_reader_kept_waiting_by_a_commit_is_told_so(tmp_path, monkeypatch):
    """A command that reads while another process holds the library locked past the wait
    (committing a write) fails naming that, not with SQLite's bare 'database is locked'."""
    path = tmp_path / "lib"
    new_library(path)
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.2)
    refused = pytest.raises(GalleryError, match="another process has been committing a write")
    with other_process_holding(path, "BEGIN EXCLUSIVE"), refused:
        Gallery.open(path)
    with Gallery.open(path) as gallery:
        assert len(gallery) == 20


def start_cli(*args: str | Path) -> subprocess.Popen:
    """`shitu ARGS` in its own process (the shipped model), its stderr a text pipe."""
    command = [sys.executable, "-m", "shitu", *map(str, args), "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_waiting(process: subprocess.Popen) -> str:
    """Read `process`'s stderr up to its note that it waits for another process's write."""
    said = ""
    while "waiting up to" not in said:
        line = process.stderr.readline()
        assert line, f"ended without waiting: {said}"
        said += line
    return said


def test_two_index_adds_at_once_both_land_and_share_duplicates_once(tmp_path):
    """Two `shitu index add` processes that both wait for a third process's write (so they
    commit one after the other, each on top of the other's): every image is added once,
    the photo both add is added by one and skipped by the other, and the library is whole."""
    images = make_images(tmp_path / "images", 7)
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, picked in ((first, images[1:4]), (second, images[3:7])):
        folder.mkdir()
        for image in picked:
            shutil.copy(image, folder / image.name)
    path = tmp_path / "lib"
    assert (
        shitu_main(["index", "build", str(images[0]), "--label", "base", "--out", str(path)]) == 0
    )
    with other_process_holding(path, "BEGIN IMMEDIATE"):
        adds = [start_cli("index", "add", path, f, "--label", f.name) for f in (first, second)]
        for add in adds:
            wait_until_waiting(add)
    outputs = [add.communicate(timeout=60) for add in adds]
    assert [add.returncode for add in adds] == [0, 0], outputs
    skipped = [out for out, _ in outputs if "skipped 1 duplicate" in out]
    assert len(skipped) == 1  # images[3], in both folders, went in once
    with Gallery.open(path) as gallery:
        assert gallery.verify() == [] and len(gallery) == 7
        assert {e.sha256 for e in gallery.entries()} == {file_sha256(i) for i in images}
    assert sorted(p.name for p in path.iterdir()) == ["gallery.sqlite", *index_files(path)]
    assert len(index_files(path)) == 1


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_add_stopped_while_waiting_for_another_writer_changes_nothing(tmp_path, signal_number):
    """Ctrl-C (or a job manager's SIGTERM) on an `index add` that waits for another
    process's write: it ends by the signal, and the library is as before, with no file
    left behind."""
    images = make_images(tmp_path / "images", 3)
    path = tmp_path / "lib"
    assert (
        shitu_main(["index", "build", str(images[0]), "--label", "base", "--out", str(path)]) == 0
    )
    before = sorted(p.name for p in path.iterdir())
    with other_process_holding(path, "BEGIN IMMEDIATE"):
        add = start_cli("index", "add", path, *images[1:], "--label", "new")
        wait_until_waiting(add)
        add.send_signal(signal_number)
        _, said = add.communicate(timeout=60)
    ended_by = {signal.SIGINT: 130, signal.SIGTERM: -signal.SIGTERM}  # as the CLI ends
    assert add.returncode == ended_by[signal_number], said
    assert "Traceback" not in said
    with Gallery.open(path) as gallery:
        assert gallery.verify() == [] and gallery.label_counts() == {"base": 1}
    assert sorted(p.name for p in path.iterdir()) == before


@pytest.mark.parametrize(
    ("add", "refusal"),
    [
        (1, r"gallery.sqlite: cannot write the library \(.*is its disk full\?\)"),
        (30, r"index-\d+-\w+.faiss: cannot write the index file \(File too large\)"),
    ],
    ids=["rows", "index-file"],
)
def test_a_write_refused_for_room_is_one_clear_error_and_changes_nothing(tmp_path, add, refusal):
    """A process that may not grow a file (RLIMIT_FSIZE: as a full disk or a quota refuses
    writes) adds 1 row (the database would grow) or 30 (a new index file, written first). The rows' error was 'cannot rollback - no
    transaction is active' (SQLite had rolled back by itself), the index file's faiss's C++
    assertion; the library stays as it was."""
    path = tmp_path / "lib"
    with Gallery.create(path, embedding_dim=WIDE, model_fingerprint="test-model") as gallery:
        gallery.add(np.random.default_rng(0).normal(size=(20, WIDE)), ["base"] * 20)
    # The database's size; for the larger write the index file's, which the new one outgrows
    # (the database is written at the commit, after it; its journal, before it, is smaller)
    grown = path / (index_files(path)[0] if add > 2 else "gallery.sqlite")
    room = grown.stat().st_size

    def out_of_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    code = f"""
        try:
            gallery.add(np.random.default_rng(1).normal(size=({add}, {WIDE})), ["new"] * {add})
        except Exception as exc:
            print(type(exc).__name__, exc)
    """
    said = run_in_other_process(path, code, preexec_fn=out_of_room)
    assert re.match(f"GalleryError .*{refusal}; nothing was changed$", said.strip()), said
    with Gallery.open(path) as gallery:
        assert gallery.verify() == [] and len(gallery) == 20
    assert sorted(p.name for p in path.iterdir()) == ["gallery.sqlite", *index_files(path)]


def test_a_write_interrupted_while_it_waits_for_a_search_lets_later_searches_in():
    """Ctrl-C while a write waited for a search to end (an add in a notebook, a search in
    another thread) left it counted as waiting: every later search waited for it for ever."""
    lock = ReadWriteLock()
    lock.acquire_read()  # a search under way
    main_thread = threading.main_thread().ident

    def press_ctrl_c_once_the_write_waits() -> None:
        while not lock._writers_waiting:
            time.sleep(0.01)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=press_ctrl_c_once_the_write_waits, daemon=True).start()
    with pytest.raises(KeyboardInterrupt), lock.write():
        pass
    lock.release_read()
    searched = threading.Event()

    def search() -> None:
        with lock.read():
            searched.set()

    threading.Thread(target=search, daemon=True).start()
    assert searched.wait(timeout=60)  # without the fix, never
