"""The Debian reference-music list and its fetcher, without the network: apt-get and dpkg are
stand-ins on PATH that serve a tar file as the package."""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile

import av
import pytest
from support import encode, tone

from training.data import debian_music as dm

FAKE_APT = """#!{python}
import pathlib, shutil, sys
state = pathlib.Path({state!r})
with open(state / "calls", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "update":
    (state / "updated").touch()
    sys.exit(0)
name = sys.argv[-1]
if not (state / "updated").exists():
    print("E: Can't select candidate version from package " + name, file=sys.stderr)
    sys.exit(100)
shutil.copy(state / (name + ".tar"), name + "_1.0_all.deb")
"""
FAKE_DPKG = """#!{python}
import sys, tarfile
assert sys.argv[1] == "-x"
tarfile.open(sys.argv[2]).extractall(sys.argv[3])
"""


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """Two packages: ``tunes`` (reference; music, a sound effect, a zipped track) and ``spare``
    (check). Returns (the packages, the file of apt-get calls)."""
    state = tmp_path / "apt"
    bin_dir = tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    ogg = encode(tone(2.0), "ogg")
    pk3 = io.BytesIO()
    with zipfile.ZipFile(pk3, "w") as z:
        z.writestr("sound/cd/zipped.ogg", ogg)
        z.writestr("maps/level.bsp", b"not audio")
    (state / "tunes.tar").write_bytes(
        _tar(
            {
                "usr/share/tunes/music/a.ogg": ogg,
                "usr/share/tunes/music/sub/b.wav": encode(tone(1.0), "wav"),
                "usr/share/tunes/music/notes.txt": b"not audio",
                "usr/share/tunes/sounds/click.ogg": ogg,
                "usr/share/tunes/data.pk3": pk3.getvalue(),
            }
        )
    )
    (state / "spare.tar").write_bytes(_tar({"usr/share/spare/music/c.ogg": ogg}))
    for name, script in (("apt-get", FAKE_APT), ("dpkg", FAKE_DPKG)):
        (bin_dir / name).write_text(script.format(python=sys.executable, state=str(state)))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    packages = [
        dm.Package(
            "tunes",
            "reference",
            "test tunes",
            ("usr/share/tunes/music", "unzipped/sound/cd"),
            ("usr/share/tunes/data.pk3",),
        ),
        dm.Package("spare", "check", "test check", ("usr/share/spare/music",)),
    ]
    return packages, state / "calls"


def test_the_list_parses_and_reserves_the_check_set():
    packages = dm.load()
    roles = {p.name: p.role for p in packages}
    assert (
        {n for n, r in roles.items() if r == "check"}
        == dm.RESERVED
        == {"singularity-music", "asc-music", "hyperrogue-music"}
    )
    assert len(roles) == len(packages) and set(roles.values()) == set(dm.ROLES)
    for p in packages:
        assert p.music and p.genre and p.tracks > 0 and p.minutes > 0 and p.codec, p.name
    clips = dm.load_clips()
    assert len(clips) >= 2 and all(roles[c.package] == "reference" for c in clips)
    # `make music` and `make agreement` fetch reference and check music only; the distill role is
    # the student's training music (`make student`)
    assert (
        sum(p.download_mb for p in packages if p.role != "distill") < 1500
        and sum(p.download_mb for p in packages) < 3000
    )


def test_a_reserved_package_cannot_be_given_another_role(tmp_path):
    text = dm.LIST.read_text().replace('name = "asc-music"\nrole = "check"', 'name = "asc-music"\nrole = "reference"')
    (tmp_path / "list.toml").write_text(text)
    with pytest.raises(ValueError, match="asc-music"):
        dm.load(tmp_path / "list.toml")


def test_fetch_unpacks_each_package_once_and_updates_the_index_after_a_failure(fake_debian, tmp_path):
    packages, calls = fake_debian
    dest = tmp_path / "music"
    folders = dm.fetch(dest, packages=packages)
    assert folders == [dest / "reference" / "tunes", dest / "check" / "spare"]
    assert all((f / dm.READY).is_file() for f in folders)
    assert calls.read_text().splitlines() == [
        "download -q tunes",
        "update -qq",
        "download -q tunes",
        "download -q spare",
    ]
    assert not (dest / "reference" / "tunes" / "usr/share/tunes/data.pk3").exists()  # unpacked, then removed
    assert not (dest / ".download" / "tunes").exists()
    dm.fetch(dest, packages=packages)
    assert len(calls.read_text().splitlines()) == 4  # nothing fetched again


def test_audio_files_lists_the_music_folders_of_one_role(fake_debian, tmp_path):
    packages, _ = fake_debian
    dest = tmp_path / "music"
    assert dm.audio_files(dest, "reference", packages=packages) == []  # nothing fetched yet
    dm.fetch(dest, roles=("reference",), packages=packages)
    assert dm.audio_files(dest, "check", packages=packages) == []
    dm.fetch(dest, packages=packages)
    tunes = dest / "reference" / "tunes"
    assert dm.audio_files(dest, "reference", packages=packages) == [
        tunes / "usr/share/tunes/music/a.ogg",
        tunes / "usr/share/tunes/music/sub/b.wav",
        tunes / "unzipped/sound/cd/zipped.ogg",
    ]
    assert dm.audio_files(dest, "check", packages=packages) == [
        dest / "check" / "spare" / "usr/share/spare/music/c.ogg"
    ]
    m = dm.measure(dm.audio_files(dest, "reference", packages=packages))
    assert m.tracks == 3 and m.minutes == round(5.0 / 60, 1) and m.codec == "opus+pcm_s16le"


def test_fetch_without_apt_get_says_what_is_missing(fake_debian, tmp_path, monkeypatch):
    packages, _ = fake_debian
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(dm.FetchError, match="needs Debian's apt-get and dpkg"):
        dm.fetch(tmp_path / "music", packages=packages)


def test_an_excerpt_is_cut_to_the_sample(tmp_path):
    src = tmp_path / "long.flac"
    src.write_bytes(encode(tone(6.0), "flac"))
    for suffix in (".mp3", ".ogg"):
        dst = tmp_path / f"clip{suffix}"
        dm.write_excerpt(src, dst, start_s=2.0, seconds=3.0)
        with av.open(str(dst)) as c:
            frames = sum(f.samples for f in c.decode(audio=0))
            rate = c.streams.audio[0].rate
        assert abs(frames / rate - 3.0) < 0.06, suffix  # the encoders' padding, tens of ms
    with pytest.raises(ValueError, match="shorter than"):
        dm.write_excerpt(src, tmp_path / "late.mp3", start_s=5.0, seconds=3.0)
