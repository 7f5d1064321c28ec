# Environments live outside the clone, keyed by the lock files, so a warm run starts in seconds.
PYTHON ?= python3
CACHE ?= $(HOME)/.cache/moodstream
MAIN_KEY := $(shell cat requirements/main.txt | sha256sum | cut -c1-16)
STUB_KEY := $(shell cat requirements/triton-stub.txt | sha256sum | cut -c1-16)
MAIN_ENV := $(CACHE)/env-main-$(MAIN_KEY)
STUB_ENV := $(CACHE)/env-triton-stub-$(STUB_KEY)
PY := .venv/bin/python

.PHONY: env link demo test test-fast lock bench
env: link

# No prerequisites: the directory name is the lock file's hash, and a fresh clone's files are
# newer than any cached environment (an mtime rule would rebuild it on every clone).
$(MAIN_ENV)/.ready:
	rm -rf $(MAIN_ENV)
	$(PYTHON) -m venv $(MAIN_ENV)
	$(MAIN_ENV)/bin/python -m pip install -q uv
	$(MAIN_ENV)/bin/uv pip install -q --python $(MAIN_ENV)/bin/python -r requirements/main.txt
	touch $@

$(STUB_ENV)/.ready:
	rm -rf $(STUB_ENV)
	$(PYTHON) -m venv $(STUB_ENV)
	$(STUB_ENV)/bin/python -m pip install -q -r requirements/triton-stub.txt
	touch $@

# The links are re-made on every call (cheap) so a fresh clone finds the cached environments.
# The project is not installed into them: commands run from the clone (`python -m pipeline`).
link: $(MAIN_ENV)/.ready $(STUB_ENV)/.ready
	ln -sfn $(MAIN_ENV) .venv
	ln -sfn $(STUB_ENV) .venv-triton

demo: env
	$(PY) -m pipeline demo $(AUDIO_DIR)

test: env
	$(PY) -m pytest

test-fast: env
	$(PY) -m pytest -m "not integration and not faults"

# `make bench [AUDIO_DIR=folder]`: benchmarks on real music (bench/run.py); not part of the tests.
# Without AUDIO_DIR it fetches Debian's warzone2100-music (30 Opus tracks) into the cache.
BENCH_AUDIO := $(CACHE)/bench-audio
BENCH_DEFAULT_DIR := $(BENCH_AUDIO)/warzone2100-music/usr/share/games/warzone2100/music
bench: env
	@if [ -z "$(AUDIO_DIR)" ]; then $(MAKE) --no-print-directory $(BENCH_AUDIO)/.ready; fi
	$(PY) -m bench.run $(or $(AUDIO_DIR),$(BENCH_DEFAULT_DIR))

$(BENCH_AUDIO)/.ready:
	rm -rf $(BENCH_AUDIO) && mkdir -p $(BENCH_AUDIO)
	cd $(BENCH_AUDIO) && (apt-get download warzone2100-music || (apt-get update -qq && apt-get download warzone2100-music))
	cd $(BENCH_AUDIO) && dpkg -x warzone2100-music_*.deb warzone2100-music && rm warzone2100-music_*.deb
	touch $@

lock:
	uv pip compile -q requirements/main.in -o requirements/main.txt --python-version 3.11
	uv pip compile -q requirements/triton-stub.in -o requirements/triton-stub.txt --python-version 3.11
