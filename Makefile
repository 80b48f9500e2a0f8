# The two commands a newcomer needs (see README.md):
#   make reproduce  set up, get the data, run the whole study from scratch into results-reproduce/, build its
#                   report, compare every run record with the committed ones in results/
#   make test       set up, get the data, run the test suite
# make study: the same study resumed in results/ (on a fresh clone it trains nothing), then report/report.pdf
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MPLBACKEND := Agg

.PHONY: study test setup data quick reproduce report zip bench clean

study: data
	$(PY) run_experiments.py
	$(PY) -m report.build --results-dir results

test: data
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Finds the official files (./data, Debian's package, $$FASHION_MNIST_DIR) or downloads and verifies them.
# As root on Debian/Ubuntu with nothing found, it first installs the package dataset-fashion-mnist,
# which is how machines without access to the download host get the official files.
data: setup
	@$(PY) preprocessing.py --no-download >/dev/null 2>&1 || $(MAKE) --no-print-directory debian-data
	$(PY) preprocessing.py

debian-data:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's dataset-fashion-mnist ..."; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
			|| echo "apt-get could not install it; trying the download instead"; \
	fi

quick: data
	$(PY) run_experiments.py --quick --results-dir results-quick
	$(PY) -m report.build --results-dir results-quick

# The whole study from scratch into a new folder, its report, then every run record compared with results/.
reproduce: data
	rm -rf results-reproduce
	$(PY) run_experiments.py --results-dir results-reproduce
	$(PY) -m report.build --results-dir results-reproduce
	$(PY) run_experiments.py --compare results-reproduce results

report: setup
	$(PY) -m report.build --results-dir results

# The submission, <group_name>.zip (report/group.toml), the report rebuilt first: every file git does not ignore,
# committed or not, under a folder of that name (so no data, environment, cache, lock or *.bad record). A
# scratch index leaves git's own untouched.
zip: report
	@name=$$($(PY) -m report.build --zip-name) && index=$$(mktemp -u) && \
	GIT_INDEX_FILE=$$index git add -A && tree=$$(GIT_INDEX_FILE=$$index git write-tree) && rm -f $$index && \
	git archive --format=zip --prefix=$$name/ -o $$name.zip $$tree && echo "wrote $$name.zip"

bench: data
	$(PY) benchmarks/bench_mlp.py
	$(PY) benchmarks/bench_cnn.py
	$(PY) benchmarks/bench_workers.py

clean:
	rm -rf $(VENV) results-quick results-reproduce .pytest_cache report/build
