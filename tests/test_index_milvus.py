"""The same gallery library on a real Milvus Lite collection (a local file, no server)."""

from __future__ import annotations

import fcntl
import re
import shutil
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from shitu.errors import GalleryError
from shitu.fileio import staging_folder
from shitu.index import Gallery, metadata
from shitu.index import gallery as gallery_module
from shitu.index.backends import IndexSyncError
from shitu.index.labels import GalleryItem
from tests.index_helpers import PixelEmbedder, clustered, make_images, run_killed, snapshot

pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")

DIM = 16


def build(tmp_path, backend: str, metric: str = "ip", count: int = 300) -> Gallery:
    gallery = Gallery.create(
        tmp_path / backend, embedding_dim=DIM, model_fingerprint="m", metric=metric, backend=backend
    )
    gallery.add(clustered(count, DIM), [f"item {i % 9}" for i in range(count)])
    return gallery


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_milvus_returns_the_same_results_as_faiss_flat(tmp_path, metric):
    queries = clustered(25, DIM, seed=4)
    queries[3] = 0.0  # no direction: no hits on either backend
    with build(tmp_path, "faiss", metric) as faiss_gallery:
        expected = faiss_gallery.search(queries, k=8)
    with build(tmp_path, "milvus", metric) as milvus_gallery:
        got = milvus_gallery.search(queries, k=8)
    assert not got.found[3].any() and got.found[np.arange(25) != 3].all()
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4)


def test_inserts_are_split_by_size_and_every_row_arrives(tmp_path, monkeypatch):
    """Wide vectors go in requests under Milvus's request limit (INSERT_BYTES): here 7 rows
    of 16 dimensions a request, 300 rows in 43 requests, the last one short."""
    from shitu.index.backends import milvus_backend

    monkeypatch.setattr(milvus_backend, "INSERT_BYTES", 7 * (DIM * 4 + 8) + 3)
    queries = clustered(25, DIM, seed=4)
    with build(tmp_path, "faiss") as faiss_gallery:
        expected = faiss_gallery.search(queries, k=8)
    with build(tmp_path, "milvus") as milvus_gallery:
        assert milvus_gallery.verify() == []
        got = milvus_gallery.search(queries, k=8)
    np.testing.assert_array_equal(got.ids, expected.ids)


@pytest.mark.parametrize(
    ("limit", "value"), [("SEARCH_BATCH", 4), ("SEARCH_BYTES", 7 * (DIM * 4 + 8 * 12) + 3)]
)
def test_searches_are_split_by_queries_and_size_and_answer_as_one_at_a_time(
    tmp_path, monkeypatch, limit, value
):
    """A Milvus server refuses more than 16,384 queries a search, and Milvus either refuses a
    request or answer over its size limit (Lite failed 2,100 queries of 32,768 dimensions):
    here 25 queries go in several requests, in order, each row its own query's hits."""
    from shitu.index.backends import milvus_backend

    queries = clustered(25, DIM, seed=4)
    with build(tmp_path, "milvus") as gallery:
        one_at_a_time = [gallery.search(query, k=8) for query in queries]
        monkeypatch.setattr(milvus_backend, limit, value)
        got = gallery.search(queries, k=8)
    np.testing.assert_array_equal(got.ids, np.concatenate([r.ids for r in one_at_a_time]))
    np.testing.assert_array_equal(got.labels, np.concatenate([r.labels for r in one_at_a_time]))
    np.testing.assert_allclose(
        got.scores, np.concatenate([r.scores for r in one_at_a_time]), atol=1e-6
    )


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
def test_equal_scores_rank_the_image_added_first_first_on_either_backend(tmp_path, index_type):
    """Copies of one photo under several labels score the same: Faiss ranked the last added
    first, Milvus in its own order, so the best label depended on the backend."""
    photo = clustered(1, DIM, seed=13)
    for backend in ("faiss", "milvus"):
        with Gallery.create(tmp_path / backend, embedding_dim=DIM, model_fingerprint="m",
                            backend=backend, index_type=index_type) as gallery:  # fmt: skip
            gallery.add(clustered(40, DIM), [f"item {i % 4}" for i in range(40)])
            labels = ["first", "second", "third"]
            gallery.add(np.repeat(photo, 3, axis=0), labels, allow_duplicates=True)
            result = gallery.search(np.repeat(photo, 2, axis=0), k=4)
        assert result.labels[:, :3].tolist() == [labels, labels], backend
        assert np.all(np.diff(result.ids[:, :3]) > 0) and np.all(result.scores[:, 3] < 0.999)


@pytest.mark.parametrize("index_type", ["Flat", "IVF"])
def test_equal_scores_cut_at_k_keep_the_images_added_first_on_either_backend(tmp_path, index_type):
    """More copies of one photo than k: Faiss keeps the first added, Milvus kept whichever
    it met (`shitu recognize`, k=1, named the third of three labels on Milvus Lite)."""
    photo = clustered(1, DIM, seed=13)
    labels = [f"copy {i}" for i in range(5)]
    for backend in ("faiss", "milvus"):
        with Gallery.create(tmp_path / backend, embedding_dim=DIM, model_fingerprint="m",
                            backend=backend, index_type=index_type) as gallery:  # fmt: skip
            gallery.add(clustered(40, DIM), [f"item {i % 4}" for i in range(40)])
            for added in (labels[:3], labels[3:]):  # 5 copies: k+1 hits tie, asked again
                gallery.add(np.repeat(photo, len(added), axis=0), added, allow_duplicates=True)
            for k in (1, 2, 4):
                result = gallery.search(np.repeat(photo, 2, axis=0), k=k)
                assert result.labels.tolist() == [labels[:k]] * 2, (backend, k)


def test_milvus_edits_survive_reopen_and_match_faiss(tmp_path):
    queries = clustered(10, DIM, seed=5)
    results = {}
    for backend in ("faiss", "milvus"):
        with build(tmp_path, backend) as gallery:
            gallery.remove(ids=[1, 2, 3])
            gallery.remove(labels=["item 4"])
            gallery.relabel("item 5", "Orange Juice 1 l")
            gallery.add(queries[:2], ["query a", "query b"])
        with Gallery.open(tmp_path / backend) as gallery:
            assert gallery.verify() == []
            results[backend] = gallery.search(queries, k=6)
            assert len(gallery) == 300 - 3 - len(range(4, 300, 9)) + 2
    assert results["milvus"].labels[0, 0] == "query a"
    np.testing.assert_array_equal(results["milvus"].ids, results["faiss"].ids)
    np.testing.assert_array_equal(results["milvus"].labels, results["faiss"].labels)


def test_labels_that_look_like_milvus_filters_edit_alike_on_both_backends(tmp_path):
    """Labels stay in SQLite (Milvus holds ids and vectors only): quotes, backslashes and
    filter syntax in a label never reach a Milvus expression, and remove only its images."""
    labels = ["Café", "牛奶 1 L", 'say "hi"', "back\\slash", "it's", "x" * 2000, "id in [1]",
              "a' or id > 0 or 'b"]  # fmt: skip
    queries = clustered(6, DIM, seed=16)
    results = {}
    for backend in ("faiss", "milvus"):
        with Gallery.create(tmp_path / backend, embedding_dim=DIM, model_fingerprint="m",
                            backend=backend) as gallery:  # fmt: skip
            gallery.add(clustered(2 * len(labels), DIM), labels * 2)
            gallery.remove(labels=["a' or id > 0 or 'b", "id in [1]"])
            gallery.relabel("it's", 'it"s')
        with Gallery.open(tmp_path / backend) as gallery:
            assert gallery.verify() == [] and len(gallery) == 2 * len(labels) - 4
            results[backend] = gallery.search(queries, k=2 * len(labels))
    np.testing.assert_array_equal(results["milvus"].ids, results["faiss"].ids)
    np.testing.assert_array_equal(results["milvus"].labels, results["faiss"].labels)
    found = set(results["milvus"].labels.ravel().tolist()) - {""}
    assert found == {*labels[:4], 'it"s', labels[5]}


def test_a_new_library_refuses_a_collection_that_another_library_holds(tmp_path):
    """Two libraries on one Milvus (a server, or a Lite file outside the library) with the
    same collection: the second one's sync would drop the first one's vectors."""
    shared = {"uri": str(tmp_path / "shared.db")}
    queries = clustered(4, DIM, seed=9)
    for failed_build in ("empty 1", "empty 2"):  # a collection without rows is taken over
        Gallery.create(tmp_path / failed_build, embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", backend_options=shared).close()  # fmt: skip
    first = Gallery.create(tmp_path / "a", embedding_dim=DIM, model_fingerprint="m",
                           backend="milvus", backend_options=shared)  # fmt: skip
    with first:
        first.add(clustered(30, DIM), [f"item {i % 3}" for i in range(30)])
        before = first.search(queries, k=3)
    (tmp_path / "b").mkdir()
    expected = f"collection 'shitu_gallery' at .* holds the vectors of the library {tmp_path}/a,"
    for replace in (False, True):  # a library that uses it: not to be replaced either
        with pytest.raises(GalleryError, match=expected):
            Gallery.create(tmp_path / "b", embedding_dim=DIM, model_fingerprint="m",
                           backend="milvus", backend_options=shared,
                           replace_collection=replace)  # fmt: skip
        assert not any((tmp_path / "b").iterdir())  # the empty folder it was given, as it was
    with Gallery.open(tmp_path / "a") as first:
        assert first.verify() == []
        np.testing.assert_array_equal(first.search(queries, k=3).ids, before.ids)


def test_replace_collection_drops_only_a_collection_that_its_library_no_longer_uses(tmp_path):
    """--replace-collection dropped whatever the collection held: a build into the Lite file
    (or server) of a library still in use, meant for one whose library was deleted, emptied
    it, and that library then searched the new one's vectors under its own labels."""
    shared = {"uri": str(tmp_path / "shared.db")}
    embedder = PixelEmbedder()
    first = [GalleryItem(str(path), "first") for path in make_images(tmp_path / "one", 3)]
    second = [GalleryItem(str(path), "second") for path in make_images(tmp_path / "two", 3, 1)]
    # built as `index build` builds, in a staging folder that then takes the library's name
    Gallery.build(tmp_path / "a", embedder, first, backend="milvus", backend_options=shared)
    with pytest.raises(GalleryError, match=f"holds the vectors of the library {tmp_path}/a, "):
        Gallery.build(tmp_path / "b", embedder, second, backend="milvus",
                      backend_options=shared, replace_collection=True)  # fmt: skip
    assert not (tmp_path / "b").exists()
    with Gallery.open(tmp_path / "a") as library:  # its own vectors, each found by itself
        found = library.search(embedder.extract_files([i.path for i in first]).features, k=1)
        assert found.ids[:, 0].tolist() == [1, 2, 3] and (found.scores > 0.999).all()
    shutil.rmtree(tmp_path / "a")  # now no library uses it: made again, in its place
    with Gallery.create_for(tmp_path / "a", embedder, backend="milvus", backend_options=shared,
                            replace_collection=True) as library:  # fmt: skip
        library.add_files(embedder, second)
    with Gallery.open(tmp_path / "a") as library:
        assert library.verify() == [] and library.label_counts() == {"second": 3}


def test_the_collection_of_a_build_killed_outright_is_replaced_and_a_running_ones_is_not(
    tmp_path,
):
    """A build killed outright leaves its staging folder, library and all, until the next
    build to its name removes it: taken for a library that uses the collection, it kept
    --replace-collection from the very collection it is for. A build still running does
    use it."""
    shared = {"uri": str(tmp_path / "shared.db")}

    def replace() -> None:
        Gallery.create(tmp_path / "b", embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", backend_options=shared,
                       replace_collection=True).close()  # fmt: skip

    with staging_folder(tmp_path / "lib", "building") as staging:  # its lock held: running
        with Gallery.create(staging, embedding_dim=DIM, model_fingerprint="m",
                            backend="milvus", backend_options=shared) as library:  # fmt: skip
            library.add(clustered(5, DIM), ["x"] * 5)
        with pytest.raises(GalleryError, match=f"the library {staging}, which uses it"):
            replace()
    assert staging.exists()  # left with its lock no longer held, as by a build killed outright
    replace()
    with Gallery.open(tmp_path / "b") as library:
        assert library.verify() == [] and len(library) == 0


def test_a_moved_library_records_its_new_folder_in_its_collection_when_opened(
    tmp_path, monkeypatch
):
    """A collection records the folder its library had when it was made: once moved, the
    library would pass for deleted, and --replace-collection drop the vectors it uses.
    Where Milvus refuses the record (read-only rights on a server), the library opens."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    shared = {"uri": str(tmp_path / "shared.db")}
    with Gallery.create(tmp_path / "a", embedding_dim=DIM, model_fingerprint="m",
                        backend="milvus", backend_options=shared) as library:  # fmt: skip
        library.add(clustered(5, DIM), ["x"] * 5)
    shutil.move(tmp_path / "a", tmp_path / "moved")
    with monkeypatch.context() as refusing:

        def refused(*args: object, **kwargs: object) -> None:
            raise MilvusException(message="simulated: permission denied")

        refusing.setattr(MilvusClient, "alter_collection_properties", refused)
        with Gallery.open(tmp_path / "moved") as library:
            assert library.verify() == []
    Gallery.open(tmp_path / "moved").close()
    with pytest.raises(GalleryError, match=f"the library {tmp_path}/moved, which uses it"):
        Gallery.create(tmp_path / "b", embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", backend_options=shared, replace_collection=True)  # fmt: skip
    with Gallery.open(tmp_path / "moved") as library:
        assert library.verify() == [] and library.label_counts() == {"x": 5}


def test_a_collection_milvus_fails_to_look_into_or_drop_for_a_new_library_is_a_gallery_error(
    tmp_path, monkeypatch
):
    """A server that fails the new library's look into its collection, or refuses the
    drop that replace_collection asks for (no right to, say): a GalleryError naming the
    collection, not pymilvus's exception, and no library."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    shared = {"uri": str(tmp_path / "shared.db")}
    with Gallery.create(tmp_path / "gone", embedding_dim=DIM, model_fingerprint="m",
                        backend="milvus", backend_options=shared) as gone:  # fmt: skip
        gone.add(clustered(5, DIM), ["x"] * 5)
    shutil.rmtree(tmp_path / "gone")

    def refused(*args: object, **kwargs: object) -> None:
        raise MilvusException(message="simulated: permission denied")

    monkeypatch.setattr(MilvusClient, "drop_collection", refused)
    with pytest.raises(GalleryError, match="Milvus failed while dropping collection "
                       r"'shitu_gallery' \(simulated: permission denied\)"):  # fmt: skip
        Gallery.create(tmp_path / "new", embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", backend_options=shared, replace_collection=True)  # fmt: skip
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(MilvusClient, "has_collection", refused)  # its first look, too
    with pytest.raises(GalleryError, match="Milvus failed while looking into collection "):
        Gallery.create(tmp_path / "new", embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", backend_options=shared)  # fmt: skip
    assert not (tmp_path / "new").exists()


def test_milvus_lite_refuses_ivfpq_before_it_writes_a_library_that_cannot_open(tmp_path):
    """Milvus Lite cannot build IVF_PQ: the collection's rows would stay unindexed and the
    collection would never load again, so every later command would fail. The way out is
    named as a Python caller gives it too, not only as the CLI's flag."""
    server = r"a Milvus server \(`uri` http://host:19530, --milvus-uri in the CLI\)$"
    with pytest.raises(GalleryError, match=f"^Milvus Lite has no IVFPQ index; .*{server}"):
        Gallery.create(tmp_path / "pq", embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", index_type="IVFPQ")  # fmt: skip
    assert not (tmp_path / "pq").exists()  # no library that would never open
    queries = clustered(4, DIM, seed=10)
    with build(tmp_path, "milvus", count=30) as gallery:
        before = gallery.search(queries, k=3)
        with pytest.raises(GalleryError, match="Milvus Lite has no IVFPQ index"):
            gallery.rebuild("IVFPQ")
    with Gallery.open(tmp_path / "milvus") as gallery:  # still Flat, and searchable
        assert gallery.manifest.index_type == "Flat" and gallery.verify() == []
        np.testing.assert_array_equal(gallery.search(queries, k=3).ids, before.ids)


def test_a_rebuild_is_refused_another_collection_or_milvus_file(tmp_path):
    """The manifest named the new place while the old collection was rebuilt, and kept with
    its vectors: the new one, built at the next open, could be another library's."""
    queries = clustered(4, DIM, seed=14)
    with build(tmp_path, "milvus", count=30) as gallery:
        before = gallery.search(queries, k=3)
        for moved in ({"collection": "other"}, {"uri": "vectors.db"}):
            with pytest.raises(GalleryError, match="rebuild keeps the index where it is; (uri|co)"):
                gallery.rebuild(**moved)
        assert gallery.manifest.generation == 1
    with Gallery.open(tmp_path / "milvus") as gallery:
        assert gallery.manifest.backend_options == {} and gallery.verify() == []
        np.testing.assert_array_equal(gallery.search(queries, k=3).ids, before.ids)
    assert sorted(path.name for path in (tmp_path / "milvus").iterdir()) == [
        "gallery.sqlite",
        "milvus.db",
    ]


def test_a_milvus_setting_its_index_type_never_reads_is_refused_and_a_rebuild_drops_it(tmp_path):
    """Milvus reads `nlist` and `nprobe` on IVF (IVF_FLAT) and IVFPQ, `ef_search` on HNSW32,
    none on Flat, as Faiss does: a library was made holding `nlist` for a Flat collection."""
    with pytest.raises(GalleryError) as caught:
        Gallery.create(tmp_path / "flat", embedding_dim=DIM, model_fingerprint="m",
                       backend="milvus", backend_options={"nlist": 8})  # fmt: skip
    assert str(caught.value) == "index option nlist: only with index_type IVF or IVFPQ (not Flat)"
    assert not (tmp_path / "flat").exists()
    queries = clustered(4, DIM, seed=15)
    with Gallery.create(tmp_path / "lib", embedding_dim=DIM, model_fingerprint="m",
                        backend="milvus", index_type="IVF",
                        backend_options={"nlist": 4, "nprobe": 4}) as gallery:  # fmt: skip
        gallery.add(clustered(30, DIM), [f"item {i % 9}" for i in range(30)])
        with pytest.raises(GalleryError, match=r"nlist: only with index_type IVF or IVFPQ \(not"):
            gallery.rebuild("HNSW32", nlist=8)
        assert gallery.rebuild("HNSW32", ef_search=32) == {"nlist": 4, "nprobe": 4}
        found = gallery.search(queries, k=3).ids
    with Gallery.open(tmp_path / "lib") as gallery:
        assert gallery.manifest.index_type == "HNSW32" and gallery.verify() == []
        assert gallery.manifest.backend_options == {"ef_search": 32}
        np.testing.assert_array_equal(gallery.search(queries, k=3).ids, found)


def test_an_empty_milvus_library_searches_verifies_and_reopens_as_faiss_does(tmp_path):
    """New, and emptied by removing every image: padding only, and no problem found."""
    queries = clustered(2, DIM, seed=17)
    for backend in ("faiss", "milvus"):
        with Gallery.create(tmp_path / backend, embedding_dim=DIM, model_fingerprint="m",
                            backend=backend) as gallery:  # fmt: skip
            assert not gallery.search(queries, k=3).found.any() and gallery.verify() == []
            gallery.add(queries, ["a", "b"])
            gallery.remove(labels=["a", "b"])
        with Gallery.open(tmp_path / backend) as gallery:
            result = gallery.search(queries, k=3)
            assert len(gallery) == 0 and gallery.verify() == [], backend
            assert not result.found.any() and np.isneginf(result.scores).all()
            assert (result.labels == "").all()


def test_a_search_asks_milvus_for_no_more_hits_than_a_server_gives(tmp_path, monkeypatch):
    """A server refuses a search for more than LIMIT_MAX hits, Milvus Lite gives them: either
    way the results are the best LIMIT_MAX, padded to k (here a limit of 6, k 10)."""
    from shitu.index.backends import milvus_backend

    monkeypatch.setattr(milvus_backend, "LIMIT_MAX", 6)
    queries = clustered(3, DIM, seed=8)
    with build(tmp_path, "faiss", count=20) as faiss_gallery:
        expected = faiss_gallery.search(queries, k=6)
    with build(tmp_path, "milvus", count=20) as milvus_gallery:
        got = milvus_gallery.search(queries, k=10)
    assert got.ids.shape == (3, 10) and (got.found.sum(axis=1) == 6).all()
    np.testing.assert_array_equal(got.ids[:, :6], expected.ids)


def test_milvus_answers_every_image_when_k_is_past_the_library(tmp_path):
    with build(tmp_path, "milvus", count=3) as gallery:
        result = gallery.search(clustered(2, DIM, seed=6), k=10**9)
    assert result.ids.shape == (2, 3) and result.found.all()


@pytest.mark.parametrize("write", ["remove", "add"])
@pytest.mark.parametrize("point", ["before-commit", "after-commit"])
def test_milvus_library_recovers_from_a_killed_write(tmp_path, point, write):
    """Before the commit: old content; after it (collection not yet updated): new content."""
    queries = clustered(5, DIM, seed=7)
    build(tmp_path, "milvus").close()
    before = snapshot(tmp_path / "milvus", queries)
    code = {
        "remove": "gallery.remove(labels=['item 0'])",
        "add": f"gallery.add(np.array({queries.tolist()}, np.float32), ['new'] * 5)",
    }[write]
    killed = run_killed(tmp_path / "milvus", point, code)
    assert killed.returncode == -9, killed.stderr
    after = snapshot(tmp_path / "milvus", queries)  # re-syncs a stale collection on open
    rows, _, labels = after
    if point == "before-commit":
        assert after == before
    elif write == "remove":
        assert len(rows) == 300 - len(range(0, 300, 9))
        assert "item 0" not in {label for row in labels for label in row}
    else:
        assert len(rows) == 305 and [row[0] for row in labels] == ["new"] * 5


def test_a_collection_milvus_cannot_read_is_refused_and_repaired_like_a_faiss_file(tmp_path):
    """Damaged Milvus Lite files: a one-line refusal that names `shitu index rebuild`, not
    Milvus's traceback, and open(repair=True) builds the collection again."""
    queries = clustered(5, DIM, seed=11)
    build(tmp_path, "milvus").close()
    before = snapshot(tmp_path / "milvus", queries)
    collections = tmp_path / "milvus" / "milvus.db" / "collections"
    if not collections.is_dir():
        pytest.skip("this milvus-lite keeps its data in one file")
    for part in collections.rglob("*"):
        if part.is_file():
            part.write_text("garbage")
    with pytest.raises(GalleryError, match="'shitu_gallery' cannot be read .*shitu index rebuild"):
        Gallery.open(tmp_path / "milvus")
    with open(tmp_path / "milvus" / "milvus.db" / "LOCK") as lock:  # the refusal closed its server
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with Gallery.open(tmp_path / "milvus", repair=True) as gallery:
        assert gallery.repaired
    assert snapshot(tmp_path / "milvus", queries) == before


def test_opening_a_stale_collection_waits_for_another_writer(tmp_path):
    """Opening re-syncs a stale collection under the read lock and records that afterwards,
    with the write lock: a writer holding that lock is waited for, not an error."""
    build(tmp_path, "milvus").close()
    killed = run_killed(tmp_path / "milvus", "after-commit", "gallery.remove(labels=['item 0'])")
    assert killed.returncode == -9, killed.stderr  # the collection now lags the manifest
    library_file = tmp_path / "milvus" / "gallery.sqlite"
    other = sqlite3.connect(library_file, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    threading.Timer(1.0, lambda: other.execute("COMMIT")).start()
    with Gallery.open(tmp_path / "milvus") as gallery:
        assert "item 0" not in gallery.label_counts()
        assert gallery.manifest.index_state["synced_generation"] == gallery.manifest.generation
    other.close()


def test_an_open_that_fails_after_connecting_releases_the_milvus_lite_file(tmp_path, monkeypatch):
    """Recording a re-sync needs the write lock; when it cannot be had, the open fails and
    closes its connection, else Milvus Lite's server keeps the file locked in this process."""
    build(tmp_path, "milvus").close()
    killed = run_killed(tmp_path / "milvus", "after-commit", "gallery.remove(labels=['item 0'])")
    assert killed.returncode == -9, killed.stderr  # the collection now lags the manifest
    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.2)
    other = sqlite3.connect(tmp_path / "milvus" / "gallery.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a writer that does not finish in time
    with pytest.raises(GalleryError, match="cannot lock the library for writing"):
        Gallery.open(tmp_path / "milvus")
    other.execute("ROLLBACK")
    other.close()
    with open(tmp_path / "milvus" / "milvus.db" / "LOCK") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_milvus_lite_file_open_elsewhere_is_refused_saying_so(tmp_path):
    """Milvus Lite says why (another process holds the file) only in its log; the error
    itself was 'Open local milvus failed'."""
    build(tmp_path, "milvus").close()
    with open(tmp_path / "milvus" / "milvus.db" / "LOCK") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a `shitu serve` holds it
        with pytest.raises(GalleryError, match="is the library open in another process"):
            Gallery.open(tmp_path / "milvus")


def test_verify_of_a_milvus_lite_library_open_elsewhere_is_an_error_not_a_problem(tmp_path):
    """A healthy library that `shitu serve` has open was reported FAILED (exit status 1, the
    status of a damaged library), sending its user to mend what was not broken."""
    build(tmp_path, "milvus", count=30).close()
    with open(tmp_path / "milvus" / "milvus.db" / "LOCK") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a `shitu serve` holds it
        verified = subprocess.run(
            [sys.executable, "-m", "shitu", "index", "verify", tmp_path / "milvus"],
            capture_output=True,
            text=True,
        )
    assert verified.returncode == 2 and verified.stdout == "", verified.stdout
    assert re.fullmatch(r"error: .*is the library open in another process.*\n", verified.stderr)


@pytest.mark.parametrize("trouble", ["open elsewhere", "damaged collection", "not a folder"])
def test_a_milvus_library_that_cannot_open_is_one_line_on_the_command_line(tmp_path, trouble):
    """pymilvus logs each failed call with its traceback, and Milvus Lite logs why it could
    not serve a file with another: both went to stderr above the command's one-line error,
    and Milvus Lite's reason was guessed (as another process) where it was something else."""
    build(tmp_path, "milvus", count=30).close()
    store = tmp_path / "milvus" / "milvus.db"
    expected = {
        "open elsewhere": "another process holds the lock on .*; is the library open in "
        "another process",
        "damaged collection": "Milvus collection 'shitu_gallery' cannot be read "
        r"\(schema file .* is not valid JSON.*shitu index rebuild",
        "not a folder": rf"cannot connect to Milvus at {re.escape(str(store))}: \[Errno 17\] "
        "File exists[^;]*$",
    }[trouble]
    with open(store / "LOCK") as lock:
        if trouble == "open elsewhere":
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a `shitu serve` holds it
        elif trouble == "damaged collection":
            (store / "collections" / "shitu_gallery" / "schema.json").write_text("garbage")
        else:  # say, another Milvus Lite's single file
            shutil.rmtree(store)
            store.write_text("garbage")
        refused = subprocess.run(
            [sys.executable, "-m", "shitu", "index", "relabel", tmp_path / "milvus", "item 1", "x"],
            capture_output=True,
            text=True,
        )
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert re.match(f"error: .*{expected}", refused.stderr), refused.stderr


def test_closing_one_of_two_galleries_on_a_milvus_lite_file_leaves_the_other_working(tmp_path):
    """A process serves a Milvus Lite file from one server, which the first Gallery to close
    stopped: the other's searches and writes then failed (one Gallery per thread, say)."""
    queries = clustered(3, DIM, seed=15)
    with build(tmp_path, "milvus", count=30) as first:
        Gallery.open(tmp_path / "milvus").close()
        with Gallery.open(tmp_path / "milvus") as second:
            before = second.search(queries, k=3)
        np.testing.assert_array_equal(first.search(queries, k=3).ids, before.ids)
        first.add(queries[:1], ["new"])
        assert first.verify() == [] and first.search(queries[:1], k=1).labels[0, 0] == "new"
    with open(tmp_path / "milvus" / "milvus.db" / "LOCK") as lock:  # the last close released it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_milvus_gone_while_a_library_is_open_is_a_gallery_error(tmp_path):
    """Searches and counts raised pymilvus's exception: a traceback from the command line,
    where the writes were one-line errors."""
    from milvus_lite.server_manager import server_manager_instance

    with build(tmp_path, "milvus", count=30) as gallery:
        server_manager_instance.release_server(str(tmp_path / "milvus" / "milvus.db"))
        failed = f"^{re.escape(str(tmp_path / 'milvus'))}: Milvus failed while"
        with pytest.raises(GalleryError, match=f"{failed} searching collection 'shitu_gallery'"):
            gallery.search(clustered(1, DIM), k=3)
        with pytest.raises(GalleryError, match=f"{failed} counting the vectors of collection"):
            gallery.verify()


def test_a_library_not_yet_refreshed_finds_only_images_it_has_the_labels_of(tmp_path):
    """Every process (or Gallery) that opens a library searches one Milvus collection: one
    that had not refreshed since another added images found them, labelled '' (a copy of
    the query at score 1.0), where a Faiss one searches the generation it loaded."""
    query = clustered(1, DIM, seed=18)
    for backend in ("faiss", "milvus"):
        with build(tmp_path, backend, count=30) as reader:
            before = reader.search(query, k=2)
            with Gallery.open(tmp_path / backend) as writer:
                writer.add(query, ["new"])
            stale = reader.search(query, k=2)
            assert reader.refresh() and reader.search(query, k=1).labels[0, 0] == "new"
        np.testing.assert_array_equal(stale.ids, before.ids, err_msg=backend)
        assert stale.labels.tolist() == before.labels.tolist(), backend


def test_a_milvus_lite_file_that_cannot_open_for_another_reason_says_that_alone(
    tmp_path, monkeypatch
):
    """'is the library open in another process?' was added to every failure to open a
    Milvus Lite file, such as milvus-lite not installed, or the folder of its file gone."""
    store = tmp_path / "elsewhere"
    store.mkdir()
    Gallery.create(tmp_path / "lib", embedding_dim=DIM, model_fingerprint="m", backend="milvus",
                   backend_options={"uri": str(store / "vectors.db")}).close()  # fmt: skip
    with monkeypatch.context() as uninstalled:
        uninstalled.setitem(sys.modules, "milvus_lite", None)  # as if not installed
        uninstalled.setitem(sys.modules, "milvus_lite.server_manager", None)
        with pytest.raises(GalleryError) as caught:
            Gallery.open(tmp_path / "lib")
    assert str(caught.value) == (
        "the milvus backend needs pymilvus (and milvus-lite for local files): "
        "pip install 'shitu[milvus]'"
    )
    shutil.rmtree(store)
    with pytest.raises(GalleryError, match=f"{re.escape(str(store))} not exists$"):
        Gallery.open(tmp_path / "lib")


def test_a_failed_reload_keeps_the_collection_searchable(tmp_path, monkeypatch):
    """Milvus Lite serves a file from one server per process, so a reload closes the old
    connection before opening the new one; when the new one fails, the old one comes back."""
    queries = clustered(3, DIM, seed=8)
    with build(tmp_path, "milvus") as reader:
        before = reader.search(queries, k=3)
        with Gallery.open(tmp_path / "milvus") as writer:
            writer.relabel("item 1", "item one")
        real_open_backend = gallery_module.open_backend
        calls = []

        def fails_once(*args, **kwargs):
            calls.append(args[1].generation)
            if len(calls) == 1:
                raise GalleryError("cannot connect to Milvus (simulated)")
            return real_open_backend(*args, **kwargs)

        monkeypatch.setattr(gallery_module, "open_backend", fails_once)
        with pytest.raises(GalleryError, match="simulated"):
            reader.refresh()
        np.testing.assert_array_equal(reader.search(queries, k=3).ids, before.ids)
        assert reader.stale() and reader.refresh()  # the next try loads the new generation
        assert "item one" in reader.label_counts()


@pytest.mark.parametrize("write", ["add", "remove", "rebuild"])
def test_a_milvus_failure_after_the_commit_is_a_gallery_error_and_reopening_mends_it(
    tmp_path, monkeypatch, write
):
    """The rows are committed before Milvus is written: its failure leaves the collection
    stale (half written, say), which the next open builds again from the stored rows."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    queries = clustered(4, DIM, seed=12)
    build(tmp_path, "milvus", count=30).close()

    def fails(*args: object, **kwargs: object) -> None:
        raise MilvusException(message="simulated: disk full")

    doing = {"add": "adding vectors to", "remove": "removing vectors from"}.get(write, "rebuilding")
    with monkeypatch.context() as failing, Gallery.open(tmp_path / "milvus") as gallery:
        failing.setattr(MilvusClient, "delete" if write == "remove" else "insert", fails)
        with pytest.raises(
            IndexSyncError,
            match=f"^{re.escape(str(tmp_path / 'milvus'))}: Milvus failed while {doing} collection "
            r"'shitu_gallery' \(simulated: disk full\); the library keeps the change",
        ):
            if write == "add":
                gallery.add(queries[:2], ["new a", "new b"])
            elif write == "remove":
                gallery.remove(labels=["item 0"])
            else:
                gallery.rebuild()
    with Gallery.open(tmp_path / "milvus") as gallery:
        assert gallery.verify() == []  # as many vectors in the collection as rows
        found = set(gallery.search(queries, k=30).labels.ravel().tolist())
    assert ("new a" in found) == (write == "add") and ("item 0" in found) == (write != "remove")
