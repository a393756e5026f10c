#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run every test.
# Used by the README's quick start and by .ci/run. Safe to re-run: installed parts are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# System packages: the browser for the page tests, the offline voices, sox, redis-server,
# bubblewrap (the code jobs' sandbox), libopus (loss concealment, through opuslib-next).
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v flite >/dev/null 2>&1 || need_apt+=(flite)
command -v sox >/dev/null 2>&1 || need_apt+=(sox)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
# speexdsp (the alternative echo canceller the tests measure) builds from source against these
command -v swig >/dev/null 2>&1 || need_apt+=(swig)
dpkg -s libspeexdsp-dev >/dev/null 2>&1 || need_apt+=(libspeexdsp-dev)
# real SIP peers for the SIP tests: a softphone, sipp scenarios, a registrar/proxy
command -v baresip >/dev/null 2>&1 || need_apt+=(baresip-core)
command -v sipp >/dev/null 2>&1 || need_apt+=(sip-tester)
command -v kamailio >/dev/null 2>&1 || [ -x /usr/sbin/kamailio ] || need_apt+=(kamailio)  # sbin: off a user PATH
# a real SFU for the meeting tests (started by the tests inside a network namespace they create)
command -v janus >/dev/null 2>&1 || need_apt+=(janus)
# the interpreter's offline machine translation (English <-> Spanish)
command -v apertium >/dev/null 2>&1 || need_apt+=(apertium)
[ -e /usr/share/apertium/modes/eng-spa.mode ] || need_apt+=(apertium-eng-spa)
[[ "$( (ldconfig -p || /sbin/ldconfig -p) 2>/dev/null)" == *libopus.so.0* ]] || need_apt+=(libopus0)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Python: the CPU build of torch first, so that no resolver ever pulls a CUDA build.
PY=${PYTHON:-python3}
echo "== pip install (torch 2.13.0 CPU, presence with llm, model and dev extras)"
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[llm,model,dev]"
# The smart-turn end-of-turn model ships inside the pipecat-ai wheel; only its file is used
# (pipecat is never imported), so none of pipecat's dependencies are installed.
if [ "$($PY -c 'import importlib.metadata as m; print(m.version("pipecat-ai"))' 2>/dev/null)" != "1.14.0" ]; then
  echo "== pip install --no-deps pipecat-ai==1.14.0 (the smart-turn v3.2 model)"
  $PY -m pip install -q --no-deps pipecat-ai==1.14.0
fi

# The job tests talk to a real Redis at 127.0.0.1:6379; start one if none answers.
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "== starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  sleep 1
fi

echo "== ruff"
$PY -m ruff check presence tests bench
echo "== pytest"
exec $PY -m pytest -q -p no:cacheprovider --durations=25 "$@"
