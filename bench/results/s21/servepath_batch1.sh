set -u
P=/tmp/sp/prof.sh
echo "### base plain"; $P /tmp/sp_base /tmp/sp/b1_base 64
echo "### base engine nice -10"; ENICE=-10 $P /tmp/sp_base /tmp/sp/b1_enice 64
echo "### new plain"; $P /work/wt-servepath /tmp/sp/b1_new 64
echo "### base api nice 10"; ANICE=10 $P /tmp/sp_base /tmp/sp/b1_anice 64
