"""CI's reading of the suite's JUnit reports (pytest --junitxml), after every run.

    python3 .ci/check_reports.py --host NAME=REPORT.xml --host NAME=REPORT.xml [--run NAME=REPORT.xml ...]

Fails (exit 1) when a report is missing, ran no test, has a failure or error; when a test is skipped on every host
(--host: the same libraries on each ComfyUI: a test that needs a newer host must run on the newer one); or when a
skip says a module could not be imported (CI installs every test requirement). Prints each run's counts and skips.
"""
import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def read(path: Path):
    """{test id: ("passed" | "skipped" | "failed", message)} and the suite's time."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    results, seconds = {}, 0.0
    for suite in suites:
        seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", child.get("message", "")
                elif child.tag == "skipped" and outcome != "failed":
                    outcome, message = "skipped", child.get("message", "")
            results[test_id] = (outcome, message)
    return results, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="append", default=[], metavar="NAME=REPORT")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=REPORT")
    args = parser.parse_args(argv)
    problems, runs = [], {}
    for spec in args.host + args.run:
        name, _, path = spec.partition("=")
        if not Path(path).is_file():
            problems.append(f"{name}: no report at {path} (the run did not finish)")
            continue
        runs[name] = read(Path(path))
    for name, (results, seconds) in runs.items():
        counts = Counter(outcome for outcome, _ in results.values())
        print(f"{name}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
              f"in {seconds:.0f} s")
        reasons = Counter(message for outcome, message in results.values() if outcome == "skipped")
        for message, n in sorted(reasons.items()):
            print(f"    skipped {n}x: {message[:220]}")
        if counts["passed"] == 0:
            problems.append(f"{name}: no test passed (ran {len(results)})")
        for test_id, (outcome, message) in results.items():
            if outcome == "failed":
                problems.append(f"{name}: {test_id} failed: {' '.join(message.split())[:300]}")
            elif outcome == "skipped" and "could not import" in message:
                problems.append(f"{name}: {test_id} skipped for a missing module ({message}); CI installs them all")
    hosts = [spec.partition("=")[0] for spec in args.host]
    if len(hosts) > 1 and all(h in runs for h in hosts):
        everywhere = set.intersection(*({t for t, (o, _) in runs[h][0].items() if o == "skipped"} for h in hosts))
        for test_id in sorted(everywhere):
            reasons = "; ".join(f"{h}: {runs[h][0][test_id][1][:120]}" for h in hosts)
            problems.append(f"{test_id} is skipped on every host ({reasons})")
    for line in problems:
        print("CI: " + line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
