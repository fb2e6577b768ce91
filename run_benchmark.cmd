@echo off
rem One click on Windows: create .venv, install FlashToken with its dev extra, run the benchmark.
rem Arguments go to the benchmark, e.g.  run_benchmark.cmd --quick
rem The same on any OS without make:   python tools/bootstrap.py bench --quick
rem Results: benchmark\out\summary.md and the PNGs beside it.
setlocal
cd /d "%~dp0"
set "PY="
where py >nul 2>nul && set "PY=py -3"
if not defined PY where python >nul 2>nul && set "PY=python"
if not defined PY (
  echo Python 3.10 or newer is needed: install it from your usual source and run this again.
  exit /b 1
)
%PY% tools\bootstrap.py bench %*
set "STATUS=%ERRORLEVEL%"
if "%STATUS%"=="0" echo Done: see benchmark\out\summary.md
exit /b %STATUS%
