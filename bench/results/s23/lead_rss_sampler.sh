#!/bin/bash
# every 5 s: timestamp and every process over 100 MiB resident: rss KiB, pid, ppid, command (first 80 chars)
OUT=$1; : > $OUT
while true; do
  ts=$(date +%s)
  ps -eo rss=,pid=,ppid=,args= | awk -v t=$ts '$1 > 102400 {printf "%s %s %s %s %s\n", t, $1, $2, $3, substr($0, index($0,$4), 80)}' >> $OUT
  sleep 5
done
