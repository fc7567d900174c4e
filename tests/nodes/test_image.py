"""The node image's cache key (no nodes needed)."""
from memsnap.nodes import image


def test_digest_is_stable():
    assert image.digest() == image.digest()


def test_digest_changes_with_the_package_list(tmp_path, monkeypatch):
    before = image.digest()
    packages = tmp_path / "packages.txt"
    packages.write_text(image.PACKAGES_FILE.read_text() + "strace\n")
    monkeypatch.setattr(image, "PACKAGES_FILE", packages)
    assert image.packages()[-1] == "strace"
    assert image.digest() != before


def test_digest_changes_with_a_rootfs_file(tmp_path, monkeypatch):
    before = image.digest()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for f in image._overlay_files():
        dst = rootfs / f.relative_to(image.ROOTFS_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())
        dst.chmod(f.stat().st_mode)
    monkeypatch.setattr(image, "ROOTFS_DIR", rootfs)
    assert image.digest() == before
    (rootfs / "etc").mkdir()
    (rootfs / "etc/motd").write_text("hello\n")
    assert image.digest() != before
