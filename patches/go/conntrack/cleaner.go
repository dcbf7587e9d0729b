//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

// This file is the UDP cleanup engine: given the service frontends and their
// serving endpoints it finds stale entries through kernel-filtered dumps and
// deletes them in batches, within a per-run budget. It is pure orchestration
// over the flowTable interface (the kernel in production, a map in tests) and
// knows nothing of Services: cleanup.go translates the proxy maps into a
// CleanupRequest.

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// CleanupMode selects how UDP conntrack cleanup runs (kubernetes/kubernetes#129982).
type CleanupMode string

const (
	// CleanupModeReconcile checks every UDP service frontend on every run,
	// like the reconciler kube-proxy has had since 1.32.
	CleanupModeReconcile CleanupMode = "Reconcile"
	// CleanupModeTargeted checks only frontends whose serving endpoints changed
	// (or that were deleted) since they were last cleaned, and retries failures.
	CleanupModeTargeted CleanupMode = "Targeted"
	// CleanupModeOff disables UDP conntrack cleanup.
	CleanupModeOff CleanupMode = "Off"
)

// CleanupPolicy is the user-facing cleanup configuration.
type CleanupPolicy struct {
	// Mode selects Reconcile, Targeted or Off; empty means Reconcile.
	Mode CleanupMode
	// MaxDeletionsPerSync bounds the entries deleted per run; the rest is
	// carried to the next run. 0 means no limit.
	MaxDeletionsPerSync int32
}

// Validate reports an unknown mode or a negative budget.
func (p CleanupPolicy) Validate() error {
	switch p.Mode {
	case "", CleanupModeReconcile, CleanupModeTargeted, CleanupModeOff:
	default:
		return fmt.Errorf("unknown conntrack cleanup mode %q (want %s, %s or %s)", p.Mode,
			CleanupModeReconcile, CleanupModeTargeted, CleanupModeOff)
	}
	if p.MaxDeletionsPerSync < 0 {
		return fmt.Errorf("conntrack cleanup budget must be >= 0, got %d", p.MaxDeletionsPerSync)
	}
	return nil
}

// Frontend is a UDP service frontend: IP:Port (ClusterIP, ExternalIP,
// LoadBalancer IP), or a NodePort on any local address when IP is invalid.
type Frontend struct {
	IP   netip.Addr
	Port uint16
}

// Serving is the set of serving endpoints (IP:port) of one frontend.
type Serving map[netip.AddrPort]struct{}

// CleanupRequest is the desired state one cleanup run works from.
type CleanupRequest struct {
	Family    uint8
	Frontends map[Frontend]Serving
}

// CleanupReport says what one run did.
type CleanupReport struct {
	FrontendsChecked int
	Scanned          int
	Deleted          int
	Pending          int
	Errors           int
	Took             time.Duration
}

// flowTable is all the engine needs from the kernel.
type flowTable interface {
	dumpFlows(f DumpFilter, visit func(Flow)) error
	deleteFlows(family uint8, flows []Flow) (int, error)
}

type pendingFlow struct {
	fe   Frontend
	flow Flow
}

// cleaner keeps what must survive between runs: what each frontend's serving
// set was when it was last cleaned (to detect changes and deleted services)
// and the stale entries left over by the budget.
type cleaner struct {
	policy  CleanupPolicy
	table   flowTable
	cleaned map[Frontend]string
	pending []pendingFlow
}

func newCleaner(table flowTable, policy CleanupPolicy) *cleaner {
	return &cleaner{policy: policy, table: table, cleaned: map[Frontend]string{}}
}

func fingerprint(s Serving) string {
	keys := make([]string, 0, len(s))
	for ap := range s {
		keys = append(keys, ap.String())
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}

// isStale is the correctness contract: an entry to frontend fe is stale when
// its reply source is not a serving endpoint. That includes frontends with
// zero endpoints (upstream skips them; a statsd flow stayed black-holed for
// hours that way) and deleted frontends (serving set empty). A NodePort
// frontend never claims entries whose original destination is an IP frontend
// of its own, so no entry is judged against the wrong service.
func isStale(fl Flow, fe Frontend, serving Serving, ipFrontends map[Frontend]bool) bool {
	if fl.Proto != syscall.IPPROTO_UDP || fl.Orig.DstPort != fe.Port {
		return false
	}
	if fe.IP.IsValid() {
		if fl.Orig.Dst != fe.IP {
			return false
		}
	} else if ipFrontends[Frontend{IP: fl.Orig.Dst, Port: fl.Orig.DstPort}] {
		return false
	}
	_, ok := serving[netip.AddrPortFrom(fl.Reply.Src, fl.Reply.SrcPort)]
	return !ok
}

// run performs one cleanup pass. Guarantees:
//  1. It never deletes an entry that is not stale under req.
//  2. Frontends that failed to dump are retried on the next run (they are
//     not recorded as cleaned).
//  3. With a budget, at most MaxDeletionsPerSync entries are deleted; the
//     rest is kept, re-checked against the next request, and deleted first.
func (c *cleaner) run(req CleanupRequest) (rep CleanupReport) {
	if c.policy.Mode == CleanupModeOff {
		return rep
	}
	start := time.Now()
	defer func() { rep.Took = time.Since(start) }()
	want := map[Frontend]Serving{}
	for fe, s := range req.Frontends {
		want[fe] = s
	}
	for fe := range c.cleaned {
		if _, ok := want[fe]; !ok {
			want[fe] = Serving{} // deleted frontend: every entry left is stale
		}
	}
	ipFrontends := map[Frontend]bool{}
	for fe := range want {
		if fe.IP.IsValid() {
			ipFrontends[fe] = true
		}
	}

	seen := map[Flow]bool{}
	var queue []pendingFlow
	for _, p := range c.pending {
		if isStale(p.flow, p.fe, want[p.fe], ipFrontends) && !seen[p.flow] {
			seen[p.flow] = true
			queue = append(queue, p)
		}
	}
	fes := make([]Frontend, 0, len(want))
	for fe := range want {
		fes = append(fes, fe)
	}
	sort.Slice(fes, func(i, j int) bool {
		if fes[i].IP != fes[j].IP {
			return fes[i].IP.Less(fes[j].IP)
		}
		return fes[i].Port < fes[j].Port
	})
	for _, fe := range fes {
		serving := want[fe]
		fp := fingerprint(serving)
		_, current := req.Frontends[fe]
		if last, ok := c.cleaned[fe]; c.policy.Mode == CleanupModeTargeted && current && ok && last == fp {
			continue
		}
		rep.FrontendsChecked++
		filter := DumpFilter{Family: req.Family, Proto: syscall.IPPROTO_UDP, OrigDst: fe.IP, OrigDstPort: fe.Port}
		err := c.table.dumpFlows(filter, func(fl Flow) {
			rep.Scanned++
			if isStale(fl, fe, serving, ipFrontends) && !seen[fl] {
				seen[fl] = true
				queue = append(queue, pendingFlow{fe: fe, flow: fl})
			}
		})
		if err != nil {
			rep.Errors++
			continue
		}
		if current {
			c.cleaned[fe] = fp
		} else {
			delete(c.cleaned, fe)
		}
	}

	now := queue
	c.pending = nil
	if b := int(c.policy.MaxDeletionsPerSync); b > 0 && len(queue) > b {
		now, c.pending = queue[:b], queue[b:]
	}
	if len(now) > 0 {
		flows := make([]Flow, len(now))
		for i, p := range now {
			flows[i] = p.flow
		}
		n, err := c.table.deleteFlows(req.Family, flows)
		rep.Deleted = n
		if err != nil {
			// Retry the whole batch next time: entries already gone answer ENOENT.
			rep.Errors++
			c.pending = append(append([]pendingFlow{}, now...), c.pending...)
		}
	}
	rep.Pending = len(c.pending)
	return rep
}

var (
	policyMu      sync.Mutex
	cleanupPolicy = CleanupPolicy{Mode: CleanupModeReconcile}
)

// SetCleanupPolicy sets the policy used by cleaners started afterwards; call
// it once at startup, before the proxier's first sync.
func SetCleanupPolicy(p CleanupPolicy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if p.Mode == "" {
		p.Mode = CleanupModeReconcile
	}
	policyMu.Lock()
	defer policyMu.Unlock()
	cleanupPolicy = p
	return nil
}

// CurrentCleanupPolicy returns the policy set by SetCleanupPolicy.
func CurrentCleanupPolicy() CleanupPolicy {
	policyMu.Lock()
	defer policyMu.Unlock()
	return cleanupPolicy
}
