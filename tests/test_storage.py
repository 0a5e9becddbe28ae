"""vlm_jax.storage: the same file operations on local disk and on a real GCS API (localhost),
and one-line errors for paths that cannot be used."""
import http.server
import json
import subprocess
import sys
import threading

import pytest

from vlm_jax import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue(
      "gcs_dir")


def test_write_read_list_glob_size_and_delete_behave_alike(root):
  storage.makedirs(root)
  storage.write_atomic(f"{root}/a/x.json", '{"k": 1}')
  storage.write_atomic(f"{root}/a/y.bin", b"\x00\x01\x02")
  with storage.open(f"{root}/b/z.txt", "w") as f:
    f.write("zz")
  assert json.loads(storage.read_text(f"{root}/a/x.json")) == {"k": 1}
  assert storage.read_bytes(f"{root}/a/y.bin") == b"\x00\x01\x02"
  assert storage.size(f"{root}/a/y.bin") == 3
  assert storage.listdir(root) == ["a", "b"]
  assert storage.listdir(f"{root}/a") == ["x.json", "y.bin"]
  assert storage.isdir(f"{root}/a") and not storage.isdir(f"{root}/a/x.json")
  assert storage.glob(f"{root}/*/*.txt") == [f"{root}/b/z.txt"]
  assert storage.glob(f"{root}/**/*.json") == [f"{root}/a/x.json"]
  storage.remove(f"{root}/a/y.bin")
  assert not storage.exists(f"{root}/a/y.bin") and storage.exists(f"{root}/a/x.json")
  storage.rmtree(f"{root}/a")
  assert not storage.exists(f"{root}/a/x.json") and storage.listdir(root) == ["b"]
  storage.rmtree(f"{root}/nothing")  # missing_ok


def test_append_grows_the_file_line_by_line(root):
  path = f"{root}/metrics.jsonl"
  storage.makedirs(root)
  writer = storage.AppendFile(path)
  for step in range(3):
    writer.write(json.dumps({"step": step}) + "\n")
  writer.close()
  storage.append(path, '{"step": 3}\n')
  # A restarted run appends to what the previous one wrote.
  again = storage.AppendFile(path)
  again.write('{"step": 4}\n')
  again.close()
  assert [json.loads(l)["step"] for l in storage.read_text(path).splitlines()] == [0, 1, 2, 3, 4]
  assert storage.listdir(root) == ["metrics.jsonl"]  # no compose parts left behind


def test_move_copy_and_local_files_for_libraries_that_need_them(root):
  storage.makedirs(root)
  for name in ("1/a", "1/sub/b"):
    storage.write_atomic(f"{root}/{name}", name.encode())
  storage.move(f"{root}/1", f"{root}/aside/1")
  assert not storage.exists(f"{root}/1/a")
  assert storage.read_bytes(f"{root}/aside/1/sub/b") == b"1/sub/b"
  with pytest.raises(storage.StorageError, match="already exists"):
    storage.move(f"{root}/aside", f"{root}/aside")
  storage.copy(f"{root}/aside/1/a", f"{root}/copied")
  assert storage.read_bytes(f"{root}/copied") == b"1/a"
  with storage.local_copy(f"{root}/aside/1/a") as local:
    assert open(local, "rb").read() == b"1/a"
  with storage.staged_write(f"{root}/shard.bin") as local:
    with open(local, "wb") as f:
      f.write(b"shard")
  assert storage.read_bytes(f"{root}/shard.bin") == b"shard"
  with pytest.raises(RuntimeError), storage.staged_write(f"{root}/failed.bin") as local:
    open(local, "wb").close()
    raise RuntimeError("writer crashed")
  assert not storage.exists(f"{root}/failed.bin")


def test_gcs_refuses_append_mode_which_gcsfs_would_turn_into_an_overwrite(gcs_dir):
  with pytest.raises(storage.StorageError, match="cannot be opened for append"):
    storage.open(f"{gcs_dir}/metrics.jsonl", "a")


def test_a_listing_sees_objects_another_process_wrote_since(gcs_dir):
  storage.write_atomic(f"{gcs_dir}/1", b"")
  assert storage.listdir(gcs_dir) == ["1"]
  subprocess.run([sys.executable, "-c", "import sys; from vlm_jax import storage; "
                  "storage.write_atomic(sys.argv[1], b'')", f"{gcs_dir}/2"], check=True)
  assert storage.listdir(gcs_dir) == ["1", "2"]
  assert storage.glob(f"{gcs_dir}/*") == [f"{gcs_dir}/1", f"{gcs_dir}/2"]


# ----------------------------------------------------------------------------------------------
# Errors: one line naming the path.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["s3://bucket/run", "hdfs://namenode/run", "gs:///run"])
def test_unsupported_or_malformed_paths_are_named(path):
  with pytest.raises(storage.StorageError, match=f"^{path}: (unsupported path scheme|no bucket)"):
    storage.check_writable(path)


def test_writable_and_readable_paths_pass(tmp_path, gcs_dir):
  for directory in (str(tmp_path / "new" / "dir"), gcs_dir):
    storage.check_writable(directory)
    storage.write_atomic(f"{directory}/shard-0.array_record", b"x")
    storage.check_readable(directory + "/shard-0.array_record")
    storage.check_readable(directory + "/shard-*.array_record")
    assert storage.listdir(directory) == ["shard-0.array_record"]  # the probe is gone


def test_missing_bucket_object_and_pattern_are_told_apart(gcs, gcs_dir):
  with pytest.raises(storage.StorageError,
                     match=r"^gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist"):
    storage.check_writable("gs://no-such-bucket/run")
  with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
    storage.check_readable("gs://no-such-bucket/data/*.array_record")
  with pytest.raises(storage.StorageError, match=f"^{gcs_dir}/tok.model: does not exist"):
    storage.check_readable(f"{gcs_dir}/tok.model")
  with pytest.raises(storage.StorageError, match="no object matches"):
    storage.check_readable(f"{gcs_dir}/*.tar")


def test_local_directory_that_cannot_be_created(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(storage.StorageError, match=f"^{tmp_path}/file/run: cannot be written"):
    storage.check_writable(str(tmp_path / "file" / "run"))


def test_no_credentials_is_reported_before_any_request(monkeypatch):
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
  with pytest.raises(storage.StorageError,
                     match=r"^gs://vlm-test/run: no Google Cloud credentials .*key\.json"):
    storage.check_writable("gs://vlm-test/run")


class _Refusing(http.server.BaseHTTPRequestHandler):
  """Answers every request as GCS does for credentials without access (403, JSON error)."""

  def _refuse(self):
    body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                 "storage.objects.create access"}}).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _refuse

  def log_message(self, *args):
    pass


def test_permission_denied_names_the_bucket(gcs, monkeypatch):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
  try:
    with pytest.raises(storage.StorageError,
                       match=r"^gs://vlm-test/run: permission denied to write .*objects.create"):
      storage.check_writable("gs://vlm-test/run")
  finally:
    server.shutdown()


def test_abspath_keeps_gcs_paths_and_anchors_local_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.abspath("gs://bucket/run") == "gs://bucket/run"  # os.path: "<cwd>/gs:/bucket/run"
  assert storage.abspath("run") == str(tmp_path / "run")
