VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench fuzz clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/netchan demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	@command -v socat >/dev/null && command -v iperf3 >/dev/null && test -x /usr/sbin/sshd || \
		{ [ "$$(id -u)" = 0 ] && apt-get install -y -qq openssh-server socat iperf3 iproute2 >/dev/null || \
		  echo "(install openssh-server, socat and iperf3 to compare tunnels with ssh and the VPN with its link)"; }
	$(PY) bench/run.py $(if $(BASELINE),--baseline $(BASELINE))

#: each decoder's coverage-guided fuzzer for FUZZ_SECONDS (default 60) seconds
fuzz: $(STAMP)
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) fuzz/run.py --seconds $(or $(FUZZ_SECONDS),60)

clean:
	rm -rf $(VENV) build src/*.egg-info .fuzz
