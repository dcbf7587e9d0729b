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

import (
	"net/netip"
	"syscall"
	"testing"
	"time"
)

func TestAsyncCleanerCoalescesAndRetriesPending(t *testing.T) {
	table := &fakeTable{flows: map[Flow]bool{}}
	for i := 0; i < 3; i++ {
		table.flows[udp(dnsVIP, 53, oldPod, 53, uint16(6000+i))] = true
	}
	reports := make(chan CleanupReport, 10)
	a := newAsyncCleaner(newCleaner(table, CleanupPolicy{Mode: CleanupModeTargeted, MaxDeletionsPerSync: 2}),
		func(_ CleanupRequest, r CleanupReport) { reports <- r })
	retries := make(chan time.Time, 10)
	a.after = func(time.Duration) <-chan time.Time { return retries } // injected clock: no sleeping
	req := CleanupRequest{Family: syscall.AF_INET, Frontends: map[Frontend]Serving{dnsFE: serving(netip.AddrPortFrom(newPod, 53))}}
	// Three submissions before the runner starts collapse into one run.
	a.Submit(req)
	a.Submit(req)
	a.Submit(req)
	stop := make(chan struct{})
	defer close(stop)
	go a.Run(stop)
	wait := func() CleanupReport {
		select {
		case r := <-reports:
			return r
		case <-time.After(5 * time.Second):
			t.Fatal("no cleanup run within 5s")
		}
		return CleanupReport{}
	}
	if r := wait(); r.Deleted != 2 || r.Pending != 1 {
		t.Fatalf("first run %+v", r)
	}
	retries <- time.Time{}
	if r := wait(); r.Deleted != 1 || r.Pending != 0 {
		t.Fatalf("retry run %+v", r)
	}
	select {
	case r := <-reports:
		t.Errorf("unexpected extra run %+v", r)
	case <-time.After(50 * time.Millisecond):
	}
	if len(table.flows) != 0 {
		t.Errorf("%d stale entries left", len(table.flows))
	}
}

func TestSetCleanupPolicyRejectsInvalid(t *testing.T) {
	if err := SetCleanupPolicy(CleanupPolicy{Mode: "bogus"}); err == nil {
		t.Errorf("invalid policy accepted")
	}
	if err := SetCleanupPolicy(CleanupPolicy{}); err != nil || CurrentCleanupPolicy().Mode != CleanupModeReconcile {
		t.Errorf("empty mode must default to Reconcile: %v %+v", err, CurrentCleanupPolicy())
	}
}
