"""Images written without a container engine (memsnap.cluster.oci), checked as `ctr import` reads them."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from memsnap.cluster import oci


def members(path: Path) -> dict[str, bytes | None]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() else None for m in tar.getmembers()}


def test_a_docker_archive_has_what_ctr_import_reads(tmp_path):
    binary = tmp_path / "tool"
    binary.write_bytes(b"\x7fELF pretend")
    binary.chmod(0o755)
    image_id = oci.write_docker_archive(tmp_path / "img.tar", "memsnap.local/tool:1",
                                        {"bin/tool": binary, "bin/sh": ("symlink", "tool"), "tmp": ("dir", 0o1777)},
                                        entrypoint=["/bin/tool"], user="65535:65535")
    files = members(tmp_path / "img.tar")
    manifest = json.loads(files["manifest.json"])
    assert manifest == [{"Config": f"{image_id}.json", "RepoTags": ["memsnap.local/tool:1"],
                         "Layers": [manifest[0]["Layers"][0]]}]
    config_bytes = files[f"{image_id}.json"]
    assert hashlib.sha256(config_bytes).hexdigest() == image_id
    config = json.loads(config_bytes)
    layer = files[manifest[0]["Layers"][0]]
    assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(layer).hexdigest()}"]
    assert config["config"]["Entrypoint"] == ["/bin/tool"] and config["config"]["User"] == "65535:65535"
    (tmp_path / "layer.tar").write_bytes(layer)
    with tarfile.open(tmp_path / "layer.tar") as tar:
        entries = {m.name: m for m in tar.getmembers()}
    assert entries["bin/tool"].mode == 0o755
    assert entries["bin/sh"].issym() and entries["bin/sh"].linkname == "tool"
    assert entries["tmp"].isdir() and entries["tmp"].mode == 0o1777
    assert entries["bin"].isdir()


def test_the_same_inputs_give_the_same_image(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    ids = {oci.write_docker_archive(tmp_path / f"{i}.tar", "memsnap.local/same:1", {"f": f}) for i in range(2)}
    assert len(ids) == 1


def test_a_tag_without_a_version_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no version"):
        oci.write_docker_archive(tmp_path / "x.tar", "memsnap.local/none", {})


def test_an_oci_layout_names_the_image_and_holds_every_blob(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    image_id = oci.write_oci_layout(tmp_path / "layout.tar", "memsnap.local/layout:2", {"f": f})
    files = members(tmp_path / "layout.tar")
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["annotations"]["io.containerd.image.name"] == "memsnap.local/layout:2"
    manifest_bytes = files[f"blobs/sha256/{desc['digest'].split(':')[1]}"]
    assert hashlib.sha256(manifest_bytes).hexdigest() == desc["digest"].split(":")[1]
    manifest = json.loads(manifest_bytes)
    assert manifest["config"]["digest"] == f"sha256:{image_id}"
    for blob in [manifest["config"], *manifest["layers"]]:
        data = files[f"blobs/sha256/{blob['digest'].split(':')[1]}"]
        assert len(data) == blob["size"] and hashlib.sha256(data).hexdigest() == blob["digest"].split(":")[1]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
