//go:build linux && conntrack_kernel

// Measurement of the series' netlink paths against a real table (standalone
// module only). Runs only when CONNTRACK_KERNEL_MEASURE=1, in a namespace the
// harness has padded (patches/tests/test_kernel_go.py pads 100k entries with
// refproxy.testing.fill). It prints figures; it asserts only correctness
// (counts), never timings.

package conntrack

import (
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// cost is one measurement: wall-clock time and this process's CPU time
// (user+system). Dumps run in our recvmsg and deletes in our sendmsg, so the
// kernel's work is charged to us; CPU time is what a busy machine does not
// inflate, wall time is what the sync sees.
type cost struct{ wall, cpu time.Duration }

func cpuNow() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func measure(f func()) cost {
	start, cpu := time.Now(), cpuNow()
	f()
	return cost{wall: time.Since(start), cpu: cpuNow() - cpu}
}

// median runs f repeat times and returns the median wall and CPU times.
func median(repeat int, f func()) cost {
	costs := make([]cost, repeat)
	for i := range costs {
		costs[i] = measure(f)
	}
	return medianCost(costs)
}

// medianCost is the median wall time and the median CPU time of costs.
func medianCost(costs []cost) cost {
	walls := make([]time.Duration, len(costs))
	cpus := make([]time.Duration, len(costs))
	for i, c := range costs {
		walls[i], cpus[i] = c.wall, c.cpu
	}
	sort.Slice(walls, func(i, j int) bool { return walls[i] < walls[j] })
	sort.Slice(cpus, func(i, j int) bool { return cpus[i] < cpus[j] })
	return cost{wall: walls[len(costs)/2], cpu: cpus[len(costs)/2]}
}

func report(t *testing.T, name string, c cost, extra string) {
	t.Helper()
	line := fmt.Sprintf("MEASURE %s wall_ms=%.2f cpu_ms=%.2f %s", name,
		float64(c.wall.Microseconds())/1000, float64(c.cpu.Microseconds())/1000, extra)
	t.Log(line)
	fmt.Println(strings.TrimSpace(line))
}

func TestKernelMeasure(t *testing.T) {
	if os.Getenv("CONNTRACK_KERNEL_MEASURE") != "1" {
		t.Skip("set CONNTRACK_KERNEL_MEASURE=1 (patches/tests/test_kernel_go.py does, after padding the table)")
	}
	k := envInt("CONNTRACK_KERNEL_MEASURE_K", 1000)
	repeat := envInt("CONNTRACK_KERNEL_MEASURE_REPEAT", 5)
	vip := netip.MustParseAddr("198.18.0.50")
	idle := Frontend{IP: netip.MustParseAddr("198.18.0.51"), Port: 53}
	base := netip.MustParseAddr("198.18.160.0")
	if b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_buckets"); err == nil {
		fmt.Printf("MEASURE info nf_conntrack_buckets=%s k=%d repeat=%d\n", strings.TrimSpace(string(b)), k, repeat)
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Printf("MEASURE info loadavg=%q\n", strings.TrimSpace(string(b)))
	}

	stale := make([]Flow, k)
	for i := range stale {
		stale[i] = natFlow(syscall.IPPROTO_UDP, clientAddr(base, i), 44000, vip, 53, kPodA, 5353)
	}
	insertFlows(t, syscall.AF_INET, stale)

	// Upstream's first step: the whole table into userspace and decoded.
	var total int
	d := median(repeat, func() {
		total = 0
		if err := dumpAll(syscall.AF_INET, func(Flow) { total++ }); err != nil {
			t.Fatal(err)
		}
	})
	report(t, "full_dump_decode", d, fmt.Sprintf("entries=%d", total))

	// This series: one frontend, filtered in the kernel.
	var matched int
	fe := DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_UDP, OrigDst: vip, OrigDstPort: 53}
	d = median(repeat, func() {
		matched = 0
		if err := (kernelTable{}).dumpFlows(fe, func(Flow) { matched++ }); err != nil {
			t.Fatal(err)
		}
	})
	if matched != k {
		t.Fatalf("filtered dump matched %d entries, want %d", matched, k)
	}
	report(t, "filtered_dump_frontend", d, fmt.Sprintf("matched=%d", matched))

	d = median(repeat, func() {
		matched = 0
		f := DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_UDP, OrigDst: idle.IP, OrigDstPort: idle.Port}
		if err := (kernelTable{}).dumpFlows(f, func(Flow) { matched++ }); err != nil {
			t.Fatal(err)
		}
	})
	if matched != 0 {
		t.Fatalf("idle frontend matched %d entries", matched)
	}
	report(t, "filtered_dump_idle_frontend", d, "matched=0")

	d = median(repeat, func() {
		matched = 0
		f := DumpFilter{Family: syscall.AF_INET, Proto: syscall.IPPROTO_UDP}
		if err := (kernelTable{}).dumpFlows(f, func(Flow) { matched++ }); err != nil {
			t.Fatal(err)
		}
	})
	report(t, "filtered_dump_udp_only", d, fmt.Sprintf("matched=%d", matched))

	// Deleting the K stale entries: batched, then (after re-inserting them)
	// one request per round trip as netlink.ConntrackDeleteFilters does.
	// Each variant runs repeat times on freshly inserted entries.
	s, err := openCTNetlink()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	variants := []struct {
		name string
		del  func() (int, error)
	}{
		{"delete_batched", func() (int, error) { return s.deleteFlows(syscall.AF_INET, stale) }},
		{"delete_one_per_request", func() (int, error) {
			n := 0
			for i := range stale {
				m, err := s.deleteFlows(syscall.AF_INET, stale[i:i+1])
				if err != nil {
					return n, err
				}
				n += m
			}
			return n, nil
		}},
	}
	for _, v := range variants {
		costs := make([]cost, 0, repeat)
		for r := 0; r < repeat; r++ {
			if r > 0 {
				insertFlows(t, syscall.AF_INET, stale)
			}
			var n int
			var derr error
			c := measure(func() { n, derr = v.del() })
			if derr != nil || n != k {
				t.Fatalf("%s: deleted %d of %d, %v", v.name, n, k, derr)
			}
			costs = append(costs, c)
		}
		report(t, v.name, medianCost(costs), fmt.Sprintf("deleted=%d", k))
		insertFlows(t, syscall.AF_INET, stale)
	}
}
